"""Atlas-scale code paths on small data: each must give what the one-shot path gives."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import spatlas
from spatlas import _keys as K
from spatlas.pp import _expression as E
from spatlas.pp._hvg import row_chunks, seurat_v3_hvg


@pytest.fixture(scope="module")
def cohort():
    return spatlas.datasets.synthetic_cohort(n_spots=400, n_genes=300, image=False, seed=3)


@pytest.mark.parametrize("batch_key", ["sample", None])
def test_chunked_seurat_v3_equals_scanpy(cohort, batch_key):
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sc.pp.highly_variable_genes(
            cohort, n_top_genes=100, flavor="seurat_v3", batch_key=batch_key, inplace=False
        )
    batches = None if batch_key is None else cohort.obs[batch_key].to_numpy()
    ours = seurat_v3_hvg(cohort.X, batches, n_top_genes=100, chunk_nnz=3_000)
    assert len(row_chunks(cohort.X.tocsr(), 3_000)) > 10  # really chunked
    np.testing.assert_array_equal(ours["highly_variable"], ref["highly_variable"])
    for column in ("means", "variances", "variances_norm", "highly_variable_rank"):
        np.testing.assert_allclose(ours[column], ref[column], rtol=1e-10, equal_nan=True)
    if batch_key is not None:
        np.testing.assert_array_equal(
            ours["highly_variable_nbatches"], ref["highly_variable_nbatches"]
        )


def test_row_chunks_cover_every_row_once():
    X = sp.random(57, 9, density=0.3, format="csr", random_state=0)
    X[10:20] = 0  # empty rows
    X.eliminate_zeros()
    chunks = row_chunks(X, 5)
    assert chunks[0][0] == 0 and chunks[-1][1] == 57
    assert all(a < b and b == c for (a, b), (c, _) in itertools.pairwise(chunks))


def test_preprocess_normalisation_equals_scanpy_and_shares_the_counts(cohort, monkeypatch):
    import scanpy as sc

    adata = cohort.copy()
    raw = adata.X.copy()
    monkeypatch.setattr("spatlas.pp._hvg.CHUNK_NNZ", 2_000)
    spatlas.pp.preprocess_expression(adata, n_top_genes=120, n_comps=10)
    ref = cohort.copy()
    ref = ref[:, adata.var_names].copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    np.testing.assert_allclose(adata.X.toarray(), ref.X.toarray(), rtol=1e-6, atol=1e-6)
    counts = adata.layers[K.COUNTS]
    np.testing.assert_array_equal(
        counts.toarray(), raw[:, cohort.var_names.isin(adata.var_names)].toarray()
    )
    # one index structure for both matrices: the normalised X costs its values only
    assert np.shares_memory(adata.X.indices, counts.indices)
    assert not np.shares_memory(adata.X.data, counts.data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hvg = sc.pp.highly_variable_genes(
            cohort[:, adata.var_names].copy(),
            n_top_genes=120,
            flavor="seurat_v3",
            batch_key="sample",
            inplace=False,
        )
    np.testing.assert_array_equal(adata.var[K.HVG].to_numpy(), hvg["highly_variable"].to_numpy())


def test_blocked_pca_matches_the_one_shot_pca(cohort, monkeypatch):
    adata = cohort.copy()
    spatlas.pp.preprocess_expression(adata, n_top_genes=150, n_comps=8)
    hvg = adata.var[K.HVG].to_numpy()
    whole = E.scaled_pca(adata.X, columns=hvg, n_comps=8, seed=0)
    monkeypatch.setattr(E, "PCA_BLOCKS_NNZ", 100)
    monkeypatch.setattr(E, "row_chunks", lambda X, chunk_nnz=0: row_chunks(X, 5_000))
    blocked = E.scaled_pca(adata.X, columns=hvg, n_comps=8, seed=0)
    np.testing.assert_allclose(blocked.variance, whole.variance, rtol=1e-6)
    np.testing.assert_allclose(blocked.variance_ratio, whole.variance_ratio, rtol=1e-6)
    np.testing.assert_allclose(blocked.scores, whole.scores, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(blocked.loadings, whole.loadings, rtol=1e-4, atol=1e-5)


def test_check_counts_in_chunks_reports_what_one_pass_reports():
    from spatlas.io._validate import check_counts

    values = np.arange(100, dtype=np.float32)
    values[[13, 77]] = -2
    values[[40]] = np.nan
    values[[55, 90]] = 0.5
    X = sp.csr_matrix(values.reshape(10, 10))
    assert check_counts(X, where="x", chunk=7) == check_counts(X, where="x")
    assert len(check_counts(X, where="x", chunk=7)) == 3


def test_evaluate_records_its_subsample(cohort, monkeypatch):
    from spatlas.metrics import _evaluate

    adata = cohort.copy()
    rng = np.random.default_rng(0)
    adata.obsm["X_test"] = rng.normal(size=(adata.n_obs, 5)).astype(np.float32)
    adata.obs["dom"] = adata.obs[K.LABEL].astype(str)
    exact = spatlas.metrics.evaluate(adata, cluster_key="dom", embedding_key="X_test")
    assert exact.set_index("sample").loc["all", "batch_metric_spots"] == adata.n_obs
    assert exact.set_index("sample").loc["all", "asw_spots"] == adata.n_obs
    monkeypatch.setattr(_evaluate, "BATCH_MAX_SPOTS", 500)
    sub = spatlas.metrics.evaluate(adata, cluster_key="dom", embedding_key="X_test")
    table = sub.set_index("sample")
    assert table.loc["all", "batch_metric_spots"] == 500
    assert table.loc["mean", "batch_metric_spots"] == 500
    # the label metrics do not depend on the subsample; the batch metrics change a little
    np.testing.assert_allclose(sub["ari"], exact["ari"])
    assert abs(table.loc["all", "ilisi"] - exact.set_index("sample").loc["all", "ilisi"]) < 0.15


def test_large_domain_maps_are_drawn_as_one_raster(cohort, monkeypatch):
    from spatlas.pl import _spatial

    adata = cohort.copy()
    adata.obs["dom"] = adata.obs[K.LABEL]
    monkeypatch.setattr(_spatial, "MAX_DOTS", 100)
    fig = spatlas.pl.spatial_domains(adata, key="dom", samples=["d0_s0"], image=False)
    ax = fig.axes[0]
    assert len(ax.images) == 1 and not ax.collections
    raster = ax.images[0].get_array()
    assert raster.shape[0] <= _spatial.RASTER_CELLS + 1
    # every spot lands in a painted cell (a hex lattice puts up to two spots in a cell)
    assert (np.asarray(raster)[..., 3] > 0).sum() >= 0.8 * (adata.obs[K.SAMPLE] == "d0_s0").sum()


def test_reading_a_cohort_h5ad_stacks_samples_without_a_second_copy(cohort, tmp_path):
    from spatlas import io

    path = tmp_path / "cohort.h5ad"
    adata = cohort.copy()
    adata.obs["section"] = adata.obs[K.SAMPLE].astype(str)
    adata.obs["patient"] = adata.obs[K.DONOR].astype(str)
    adata.obs = adata.obs.drop(columns=[K.SAMPLE, K.DONOR])
    adata.write_h5ad(path)
    parts = io.read_h5ad(path, sample_key="section", donor_key="patient")
    plain = io.concat_samples(parts)
    assert all(p.X is not None for p in parts)  # the user's samples are left alone
    consumed = io.concat_samples(parts, consume=True)
    assert all(p.X is None for p in parts)
    np.testing.assert_array_equal(consumed.X.toarray(), plain.X.toarray())
    assert consumed.obs_names.equals(plain.obs_names)
    pd.testing.assert_frame_equal(consumed.obs, plain.obs)
    np.testing.assert_array_equal(consumed.obsm[K.SPATIAL], plain.obsm[K.SPATIAL])


@pytest.mark.parametrize("user_holds_x", [False, True])
def test_dropping_undetected_genes_keeps_what_the_user_holds(cohort, user_holds_x):
    adata = cohort.copy()
    adata.X = adata.X.tocsr()
    adata.X[:, 7] = 0  # two genes nobody detects
    adata.X[:, 100] = 0
    adata.X.eliminate_zeros()
    before = adata.X.copy()
    held = adata.X if user_holds_x else None
    spatlas.pp.preprocess_expression(adata, n_top_genes=100, n_comps=5)
    assert adata.n_vars == cohort.n_vars - 2
    keep = np.ones(cohort.n_vars, dtype=bool)
    keep[[7, 100]] = False
    np.testing.assert_array_equal(adata.layers[K.COUNTS].toarray(), before[:, keep].toarray())
    if user_holds_x:  # the user's matrix is untouched
        np.testing.assert_array_equal(held.toarray(), before.toarray())


def test_pca_fitted_on_a_subsample_projects_every_spot(cohort):
    adata = cohort.copy()
    spatlas.pp.preprocess_expression(adata, n_top_genes=150, n_comps=6)
    hvg = adata.var[K.HVG].to_numpy()
    whole = E.scaled_pca(adata.X, columns=hvg, n_comps=6, seed=0)
    sub = E.scaled_pca(adata.X, columns=hvg, n_comps=6, fit_spots=1200, seed=0)
    assert sub.scores.shape == whole.scores.shape
    # the leading components agree closely; the variances are those of the projected scores
    for j in range(2):
        r = abs(np.corrcoef(sub.scores[:, j], whole.scores[:, j])[0, 1])  # signs: a convention
        assert r > 0.98, (j, r)
    np.testing.assert_allclose(sub.variance, sub.scores.var(axis=0, ddof=1), rtol=1e-4)
    again = E.scaled_pca(adata.X, columns=hvg, n_comps=6, fit_spots=1200, seed=0)
    np.testing.assert_array_equal(again.scores, sub.scores)  # deterministic


def test_pca_max_spots_is_checked_before_work():
    from spatlas._config import ConfigError
    from spatlas.pipeline import Config, check_config

    config = Config()
    config.preprocessing.pca_max_spots = 10
    with pytest.raises(ConfigError, match="pca_max_spots"):
        check_config(config)


@pytest.fixture(scope="module")
def cohort_file(cohort, tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "cohort.h5ad"
    adata = cohort.copy()
    adata.obs["section"] = adata.obs[K.SAMPLE].astype(str)
    adata.obs["patient"] = adata.obs[K.DONOR].astype(str)
    adata.obs = adata.obs.drop(columns=[K.SAMPLE, K.DONOR])
    # interleave the samples' rows: the file's order is not the cohort's
    order = np.random.default_rng(0).permutation(adata.n_obs)
    adata[order].copy().write_h5ad(path)
    return path


@pytest.mark.parametrize("fit_spots", [None, 1500])
def test_streamed_preprocessing_equals_the_in_memory_one(cohort_file, monkeypatch, fit_spots):
    from spatlas.io._stream import H5adCounts

    parts = spatlas.io.read_h5ad(cohort_file, sample_key="section", donor_key="patient")
    memory = spatlas.io.concat_samples(parts)
    spatlas.pp.preprocess_expression(memory, n_top_genes=120, n_comps=8, pca_max_spots=fit_spots)
    parts = spatlas.io.read_h5ad(
        cohort_file, sample_key="section", donor_key="patient", counts=False
    )
    streamed = spatlas.io.concat_samples(parts, consume=True)
    streamed.X = None
    assert streamed.obs_names.equals(memory.obs_names)
    monkeypatch.setattr("spatlas.io._stream.STREAM_CHUNK_NNZ", 7_000)
    counts = H5adCounts(cohort_file)
    assert len(list(counts.chunks(7_000))) > 10
    spatlas.pp.preprocess_streaming(
        streamed, counts, n_top_genes=120, n_comps=8, pca_max_spots=fit_spots
    )
    assert streamed.X is None
    assert streamed.var_names.equals(memory.var_names)
    np.testing.assert_array_equal(streamed.var[K.HVG], memory.var[K.HVG])
    np.testing.assert_allclose(
        streamed.var["variances_norm"], memory.var["variances_norm"], rtol=1e-9
    )
    a, b = streamed.obsm[K.PCA], memory.obsm[K.PCA]
    for j in range(4):
        assert abs(np.corrcoef(a[:, j], b[:, j])[0, 1]) > 0.999, j
    np.testing.assert_allclose(
        streamed.uns["pca"]["variance"][:4], memory.uns["pca"]["variance"][:4], rtol=1e-3
    )


def _config(path, tmp_path, **sections):
    import yaml

    config = {
        "seed": 0,
        "data": {
            "h5ad": str(path),
            "sample_key": "section",
            "donor_key": "patient",
            "label_column": "label",
        },
        "preprocessing": {"n_top_genes": 120, "n_comps": 8},
        "clustering": {"n_clusters": 5},
    }
    for key, value in sections.items():
        config.setdefault(key, {}).update(value)
    file = tmp_path / "config.yaml"
    file.write_text(yaml.safe_dump(config))
    return file


def test_a_streamed_run_writes_domains_without_the_matrix(cohort_file, tmp_path):
    from spatlas._config import load_config
    from spatlas.pipeline import run

    config = _config(
        cohort_file, tmp_path, data={"streaming": True}, augmentation={"enabled": False}
    )
    result = run(load_config(config), out=tmp_path / "run")
    assert result.adata.X is None
    table = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert table.loc[table["sample"] == "mean", "ari"].iloc[0] > 0.3
    written = __import__("anndata").read_h5ad(tmp_path / "run" / "cohort.h5ad")
    assert K.FILE_ROW in written.obs and "harmony_domain" in written.obs


def test_streaming_lists_the_settings_it_needs(cohort_file, tmp_path):
    from spatlas._config import ConfigError, load_config
    from spatlas.pipeline import plan_memory

    config = load_config(_config(cohort_file, tmp_path, data={"streaming": True}))
    with pytest.raises(ConfigError, match=r"augmentation\.enabled: false"):
        plan_memory(config)


def test_a_cohort_too_large_for_memory_is_refused_before_work(cohort_file, tmp_path, monkeypatch):
    from spatlas._config import load_config
    from spatlas._errors import SpatlasInputError
    from spatlas.pipeline import plan_memory

    monkeypatch.setattr("spatlas.io._stream.available_memory", lambda: 1e6)
    config = load_config(_config(cohort_file, tmp_path, data={"streaming": False}))
    with pytest.raises(SpatlasInputError, match=r"need about .* of memory"):
        plan_memory(config)
    # auto: too large even streamed -> refused; streamed when that fits and the settings allow
    config = load_config(
        _config(cohort_file, tmp_path, data={"streaming": "auto"}, augmentation={"enabled": False})
    )
    with pytest.raises(SpatlasInputError, match="even with the counts streamed"):
        plan_memory(config)
    monkeypatch.setattr("spatlas.io._stream.available_memory", lambda: 1e11)
    monkeypatch.setattr("spatlas.io._stream.memory_estimate", lambda n, nnz: 1e12)
    assert plan_memory(config) is not None


def test_a_failing_loess_is_refitted_with_a_wider_span(cohort, monkeypatch, caplog):
    import skmisc.loess

    real = skmisc.loess.loess
    spans = []

    class Flaky:
        def __init__(self, x, y, span, degree):
            spans.append(span)
            self.span, self.model = span, real(x, y, span=span, degree=degree)

        def fit(self):
            if self.span < 0.5:  # what scanpy hits on small batches
                raise ValueError("b'svddc failed in l2fit.'")
            self.model.fit()

        @property
        def outputs(self):
            return self.model.outputs

    flaky = Flaky

    monkeypatch.setattr(skmisc.loess, "loess", flaky)
    with caplog.at_level("WARNING", logger="spatlas"):
        df = seurat_v3_hvg(cohort.X, cohort.obs[K.SAMPLE].to_numpy(), n_top_genes=80)
    assert df["highly_variable"].sum() == 80
    assert 0.3 in spans and 0.5 in spans
    assert "refitted with a wider span" in caplog.text
