"""spatlas.metrics: formulas against scikit-learn / harmonypy / hand-computed values."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.stats import chi2, chisquare
from sklearn.metrics import (
    adjusted_rand_score,
    normalized_mutual_info_score,
    silhouette_samples,
    silhouette_score,
)

from spatlas import metrics as M
from spatlas._errors import SpatlasInputError

# --------------------------------------------------------------------------- helpers


def blobs(n: int, n_dims: int, centers: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return centers[groups] + rng.normal(size=(n, n_dims))


# --------------------------------------------------------------------------- ARI / NMI


def test_ari_nmi_match_sklearn():
    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 5, 300), rng.integers(0, 4, 300)
    assert M.ari(t, p) == pytest.approx(adjusted_rand_score(t, p), abs=1e-12)
    assert M.nmi(t, p) == pytest.approx(
        normalized_mutual_info_score(t, p, average_method="arithmetic"), abs=1e-12
    )


def test_ari_hand_computed_toy():
    # contingency [[2, 1, 0], [0, 1, 2]]: index 2, expected 6·3/15, max 4.5 -> 0.8 / 3.3
    assert M.ari([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(0.8 / 3.3)
    assert M.ari(["a", "a", "b", "b"], [1, 0, 1, 0]) == pytest.approx(-0.5)
    assert M.nmi(["a", "a", "b", "b"], [7, 7, 3, 3]) == pytest.approx(1.0)


def test_nmi_uses_arithmetic_normalisation():
    t = [0, 0, 0, 0, 1, 1, 2, 2]
    p = [0, 0, 1, 1, 1, 1, 1, 2]
    arith = normalized_mutual_info_score(t, p, average_method="arithmetic")
    assert arith != pytest.approx(normalized_mutual_info_score(t, p, average_method="geometric"))
    assert M.nmi(t, p) == pytest.approx(arith)


def test_ari_nmi_drop_missing_labels():
    t = np.array(["a", "a", None, "b", "b", np.nan, "c"], dtype=object)
    p = np.array([0, 0, 1, 1, 1, 0, 2])
    keep = [0, 1, 3, 4, 6]
    t_kept = t[keep].astype(str)
    assert M.ari(t, p) == pytest.approx(adjusted_rand_score(t_kept, p[keep]))
    assert M.nmi(pd.Series(t), p) == pytest.approx(normalized_mutual_info_score(t_kept, p[keep]))
    assert np.isnan(M.ari([None, np.nan], [0, 1]))


def test_ari_donor_lower_when_clusters_ignore_donors():
    donors = np.repeat(["d1", "d2"], 50)
    assert M.ari_donor(donors, donors) == pytest.approx(1.0)
    clusters = np.tile([0, 1], 50)  # same mix of clusters in each donor
    assert M.ari_donor(clusters, donors) == pytest.approx(0.0, abs=0.02)
    assert np.isnan(M.ari_donor(clusters, np.repeat("d1", 100)))


# --------------------------------------------------------------------------- silhouettes


def test_asw_label_is_rescaled_sklearn_silhouette():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 400)
    X = blobs(400, 5, rng.normal(scale=2, size=(4, 5)), labels, seed=2)
    expected = (silhouette_score(X, labels) + 1) / 2
    assert M.asw_label(X, labels) == pytest.approx(expected, abs=1e-12)


def test_asw_label_hand_computed_and_ignores_missing():
    X = np.array([[0.0], [1.0], [10.0], [11.0], [5.0]])
    labels = ["a", "a", "b", "b", None]
    s = (2 - 1 / 10.5 - 1 / 9.5) / 2  # mean silhouette of the four labelled points
    assert M.asw_label(X, labels) == pytest.approx((s + 1) / 2)


def test_asw_label_subsample_is_deterministic_and_matches_sklearn_on_subset():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 1000)
    X = blobs(1000, 4, rng.normal(scale=2, size=(3, 4)), labels, seed=4)
    a = M.asw_label(X, labels, max_spots=300, seed=7)
    assert a == M.asw_label(X, labels, max_spots=300, seed=7)
    rows = np.sort(np.random.default_rng(7).choice(1000, size=300, replace=False))
    assert a == pytest.approx((silhouette_score(X[rows], labels[rows]) + 1) / 2)
    assert a != M.asw_label(X, labels, max_spots=300, seed=8)


def test_asw_batch_hand_computed_toy():
    # one label; per-spot 1 − |s| = 0.6, 0.55, 0.5, 0.55
    X = np.array([[0.0], [1.0], [10.0], [11.0]])
    assert M.asw_batch(X, ["a", "b", "a", "b"], ["L"] * 4) == pytest.approx(0.55)
    assert M.asw_batch(X, ["a", "b", "a", "b"]) == pytest.approx(0.55)  # no labels: one group


def test_asw_batch_averages_over_spots_then_labels_and_skips_single_batch_labels():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(150, 3))
    X[100:130] += 8
    labels = np.array([0] * 100 + [1] * 30 + [2] * 20)
    batch = rng.integers(0, 2, 150)
    batch[100:115], batch[115:130] = 0, 1
    X[115:130] += 4  # label 1: its two batches apart
    batch[130:] = 0  # label 2: a single batch, skipped
    per_label = [
        np.mean(1 - np.abs(silhouette_samples(X[labels == g], batch[labels == g]))) for g in (0, 1)
    ]
    assert M.asw_batch(X, batch, labels) == pytest.approx(np.mean(per_label))
    assert per_label[0] > 0.8 > per_label[1]


# --------------------------------------------------------------------------- LISI


def test_lisi_matches_harmonypy_compute_lisi():
    from harmonypy import compute_lisi

    rng = np.random.default_rng(6)
    X = rng.normal(size=(500, 6))
    X[:250] += 1.5
    batch = rng.integers(0, 3, 500)
    ref = compute_lisi(X, pd.DataFrame({"b": batch.astype(str)}), ["b"], perplexity=30)[:, 0]
    ours = M.lisi(X, batch, k=90, perplexity=30)
    np.testing.assert_allclose(ours, ref, rtol=1e-7, atol=1e-9)
    knn = M.neighbors(X, 120)  # more neighbours than needed: lisi takes the first 90
    np.testing.assert_allclose(M.lisi(knn, batch), ref, rtol=1e-7, atol=1e-9)
    ref10 = compute_lisi(X, pd.DataFrame({"b": batch}), ["b"], perplexity=10)[:, 0]
    np.testing.assert_allclose(M.lisi(X, batch, k=30, perplexity=10), ref10, rtol=1e-7)


def test_lisi_chunks_and_subsamples_consistently(monkeypatch):
    from spatlas.metrics import _batch

    rng = np.random.default_rng(15)
    X = rng.normal(size=(700, 4))
    batch = rng.integers(0, 2, 700)
    whole = M.lisi(X, batch)
    monkeypatch.setattr(_batch, "_LISI_CHUNK", 64)
    np.testing.assert_array_equal(M.lisi(X, batch), whole)
    sub = M.neighbors(X, 90, max_spots=100, seed=2)
    np.testing.assert_allclose(M.lisi(sub, batch), whole[sub.query], rtol=1e-12)
    assert M.kbet(X, batch, max_spots=100, seed=2) == M.kbet(sub, batch)


@pytest.mark.parametrize("n_batches", [2, 3])
def test_ilisi_near_one_for_mixed_batches(n_batches):
    rng = np.random.default_rng(n_batches)
    X = rng.normal(size=(1500, 10))
    batch = rng.integers(0, n_batches, 1500)
    # below 1 only by sampling noise in ~30 effective neighbours
    assert M.ilisi(X, batch) > 0.8


def test_ilisi_zero_for_separated_batches_and_nan_for_one_batch():
    batch = np.repeat([0, 1, 2], 300)
    X = blobs(900, 10, np.eye(3, 10) * 50, batch, seed=9)
    assert M.ilisi(X, batch) == pytest.approx(0.0, abs=1e-6)
    assert np.isnan(M.ilisi(X, np.zeros(900)))


# --------------------------------------------------------------------------- kBET


def test_kbet_neighbourhood_includes_the_spot_itself():
    # batches a = spots 0-3, b = spots 4-7; k = 4 -> the spot plus its 3 listed neighbours.
    batch = np.array(list("aaaabbbb"))
    idx = np.array(
        [
            [1, 2, 3],  # a + aaa: counts (4, 0), χ² = 4, p = 0.046 -> rejected
            [0, 2, 3],  # rejected
            [4, 5, 0],  # a + bba: (2, 2), χ² = 0 -> accepted
            [4, 5, 6],  # a + bbb: (1, 3), χ² = 1, p = 0.32 -> accepted
            [5, 6, 7],  # b + bbb: rejected
            [0, 1, 2],  # b + aaa: accepted
            [0, 1, 7],  # b + aab: accepted
            [0, 4, 5],  # b + abb: accepted
        ]
    )
    knn = M.Neighbors(idx, np.ones(idx.shape), np.arange(8), 8)
    assert M.kbet(knn, batch, k=4) == pytest.approx(5 / 8)
    assert chi2.sf(4.0, 1) < 0.05 < chi2.sf(1.0, 1)


def test_kbet_statistic_matches_scipy_chisquare():
    rng = np.random.default_rng(10)
    X = rng.normal(size=(400, 5))
    batch = (X[:, 0] + rng.normal(scale=0.7, size=400) > 0).astype(int) + (rng.random(400) < 0.2)
    knn = M.neighbors(X, 19)
    freq = np.bincount(batch) / 400
    accepted = []
    for i in range(400):
        hood = np.concatenate([[batch[i]], batch[knn.indices[i]]])
        p = chisquare(np.bincount(hood, minlength=3), freq * 20).pvalue
        accepted.append(p >= 0.05)
    assert M.kbet(knn, batch, k=20) == pytest.approx(np.mean(accepted))
    assert M.kbet(X, batch, k=20) == pytest.approx(np.mean(accepted))


def test_kbet_high_for_mixed_low_for_separated():
    rng = np.random.default_rng(11)
    X = rng.normal(size=(1500, 10))
    assert M.kbet(X, rng.integers(0, 2, 1500)) >= 0.8
    assert M.kbet(X, rng.integers(0, 3, 1500)) >= 0.8
    batch = np.repeat([0, 1], 750)
    X[750:] += 30
    assert M.kbet(X, batch) == pytest.approx(0.0, abs=0.01)


def test_kbet_per_label_uses_each_labels_own_batch_mix():
    # Two separated labels; batches mixed within each label but in different proportions.
    rng = np.random.default_rng(12)
    labels = np.repeat([0, 1], 800)
    X = blobs(1600, 8, np.eye(2, 8) * 40, labels, seed=13)
    batch = np.where(labels == 0, rng.random(1600) < 0.8, rng.random(1600) < 0.2).astype(int)
    plain, per_label = M.kbet(X, batch), M.kbet(X, batch, labels=labels)
    assert plain < 0.1
    assert per_label >= 0.8
    tiny = np.where(np.arange(1600) < 5, 2, labels)  # a 5-spot label is skipped, not scored
    assert M.kbet(X, batch, labels=tiny) == pytest.approx(
        M.kbet(X[5:], batch[5:], labels=labels[5:]), abs=0.02
    )
    with pytest.raises(SpatlasInputError):
        M.kbet(M.neighbors(X, 49), batch, labels=labels)


# --------------------------------------------------------------------------- neighbours, composite


def test_neighbors_subsampled_queries_exclude_themselves():
    rng = np.random.default_rng(14)
    X = rng.normal(size=(200, 3))
    X[1] = X[0]  # a duplicate point
    knn = M.neighbors(X, 5, max_spots=50, seed=0)
    assert knn.indices.shape == (50, 5)
    assert not (knn.indices == knn.query[:, None]).any()
    full = M.neighbors(X, 5)
    np.testing.assert_allclose(knn.distances, full.distances[knn.query])
    with pytest.raises(SpatlasInputError):
        full.head(6)


def test_composite_formula():
    bio = {"ari": 0.5, "nmi": 0.6, "asw_label": 0.7}
    batch = {"ilisi": 0.2, "kbet": 0.4}
    assert M.composite(bio, batch) == pytest.approx(0.6 * 0.6 + 0.4 * 0.3)
    assert M.composite([0.5, 0.6, 0.7], [0.2, 0.4], lam=0.5) == pytest.approx(0.45)
    assert M.composite(bio, [np.nan], lam=1.0) == pytest.approx(0.6)
    assert np.isnan(M.composite(bio, [np.nan, 0.2]))
    with pytest.raises(SpatlasInputError):
        M.composite(bio, batch, lam=1.5)


# --------------------------------------------------------------------------- evaluate


def make_cohort(seed: int = 0) -> ad.AnnData:
    """4 samples × 150 spots, 2 donors, 3 domains; s4 has no labelled spot."""
    rng = np.random.default_rng(seed)
    n = 600
    sample = np.repeat(["s1", "s2", "s3", "s4"], 150)
    donor = np.where(np.isin(sample, ["s1", "s2"]), "d1", "d2")
    domain = rng.integers(0, 3, n)
    X = blobs(n, 8, rng.normal(scale=3, size=(3, 8)), domain, seed + 1)
    X[sample == "s2"] += 0.5
    label = np.array([f"L{d}" for d in domain], dtype=object)
    label[rng.random(n) < 0.1] = None
    label[rng.random(n) < 0.1] = "undetermined"
    label[sample == "s4"] = None
    clusters = np.where(rng.random(n) < 0.8, domain, rng.integers(0, 3, n)).astype(str)
    obs = pd.DataFrame(
        {
            "sample": pd.Categorical(sample),
            "donor": donor,
            "label": pd.Categorical(label),
            "clusters": clusters,
        },
        index=[f"spot{i}" for i in range(n)],
    )
    adata = ad.AnnData(obs=obs)
    adata.obsm["X_emb"] = X.astype(np.float32)
    return adata


def test_evaluate_table_rows_and_label_filtering():
    adata = make_cohort()
    before_obs, before_X = adata.obs.copy(), adata.obsm["X_emb"].copy()
    table = M.evaluate(
        adata, cluster_key="clusters", embedding_key="X_emb", exclude_labels=["undetermined"]
    )
    pd.testing.assert_frame_equal(adata.obs, before_obs)  # no mutation
    np.testing.assert_array_equal(adata.obsm["X_emb"], before_X)
    assert list(table.columns) == list(M.COLUMNS)
    assert list(table["sample"]) == ["s1", "s2", "s3", "s4", "mean", "all"]
    t = table.set_index("sample")

    obs = adata.obs
    lab = obs["label"].astype(object)
    ok = lab.notna() & (lab != "undetermined")
    for s in ("s1", "s2", "s3"):
        m = (obs["sample"] == s).to_numpy() & ok.to_numpy()
        assert t.loc[s, "n_spots"] == 150
        assert t.loc[s, "n_labelled"] == m.sum()
        assert t.loc[s, "ari"] == pytest.approx(
            adjusted_rand_score(lab[m].astype(str), obs["clusters"][m])
        )
        X = adata.obsm["X_emb"].astype(np.float64)
        assert t.loc[s, "asw_label"] == pytest.approx(
            (silhouette_score(X[m], lab[m].astype(str)) + 1) / 2
        )
        assert t.loc[s, ["asw_batch", "ilisi", "kbet", "composite", "ari_donor"]].isna().all()
    assert t.loc["s4", "n_labelled"] == 0
    assert t.loc["s4", ["ari", "nmi", "asw_label"]].isna().all()

    bio = ["ari", "nmi", "asw_label"]
    for col in bio:  # mean row: over labelled samples only (s4 excluded)
        assert t.loc["mean", col] == pytest.approx(t.loc[["s1", "s2", "s3"], col].mean())
    assert t.loc["mean", "n_labelled"] == t.loc["all", "n_labelled"] == ok.sum()
    for col in ["asw_batch", "ilisi", "kbet", "ari_donor"]:  # pooled batch metrics repeated
        assert t.loc["mean", col] == t.loc["all", col]
        assert np.isfinite(t.loc["all", col])

    assert t.loc["all", "ari"] == pytest.approx(
        adjusted_rand_score(lab[ok].astype(str), obs["clusters"][ok])
    )
    assert t.loc["all", "ari_donor"] == pytest.approx(
        adjusted_rand_score(obs["donor"], obs["clusters"])
    )
    for row in ("mean", "all"):
        expected = 0.6 * t.loc[row, bio].mean() + 0.4 * t.loc[row, ["ilisi", "kbet"]].mean()
        assert t.loc[row, "composite"] == pytest.approx(expected)


def test_evaluate_excluded_labels_change_counts():
    adata = make_cohort()
    kept = M.evaluate(adata, cluster_key="clusters").set_index("sample")
    dropped = M.evaluate(adata, cluster_key="clusters", exclude_labels="undetermined")
    dropped = dropped.set_index("sample")
    n_undetermined = int((adata.obs["label"] == "undetermined").sum())
    assert kept.loc["all", "n_labelled"] - dropped.loc["all", "n_labelled"] == n_undetermined
    assert kept.loc["all", "ari"] != dropped.loc["all", "ari"]
    # no embedding: silhouettes and batch metrics are NaN
    assert kept[["asw_label", "ilisi", "kbet", "composite"]].isna().all().all()


def test_evaluate_without_labels_gives_batch_metrics_and_ari_donor():
    adata = make_cohort()
    del adata.obs["label"]
    t = M.evaluate(adata, cluster_key="clusters", embedding_key="X_emb").set_index("sample")
    assert t[["ari", "nmi", "asw_label", "composite"]].isna().all().all()
    assert (t["n_labelled"] == 0).all()
    assert t.loc["all", ["asw_batch", "ilisi", "kbet", "ari_donor"]].notna().all()
    X = adata.obsm["X_emb"]
    assert t.loc["all", "kbet"] == pytest.approx(M.kbet(X, adata.obs["sample"]))
    assert t.loc["all", "ilisi"] == pytest.approx(M.ilisi(X, adata.obs["sample"]))


def test_evaluate_uses_per_label_kbet_when_labels_present():
    adata = make_cohort()
    t = M.evaluate(adata, cluster_key="clusters", embedding_key="X_emb").set_index("sample")
    X, lab = adata.obsm["X_emb"], adata.obs["label"]
    assert t.loc["all", "kbet"] == pytest.approx(M.kbet(X, adata.obs["sample"], labels=lab))


def test_evaluate_is_deterministic():
    adata = make_cohort(seed=3)
    a = M.evaluate(adata, cluster_key="clusters", embedding_key="X_emb", seed=1)
    b = M.evaluate(adata, cluster_key="clusters", embedding_key="X_emb", seed=1)
    pd.testing.assert_frame_equal(a, b)


def test_evaluate_reports_missing_keys():
    adata = make_cohort()
    with pytest.raises(SpatlasInputError, match="nope"):
        M.evaluate(adata, cluster_key="nope")
    with pytest.raises(SpatlasInputError, match="X_missing"):
        M.evaluate(adata, cluster_key="clusters", embedding_key="X_missing")


def test_import_is_cheap():
    code = (
        "import sys, spatlas.metrics; "
        "print([m for m in ('sklearn', 'scanpy', 'scipy.stats') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
