import anndata as ad
import numpy as np
import pandas as pd
import pytest

from spatlas import tl
from spatlas._errors import SpatlasInputError
from spatlas.tl import _refine


def hex_patch(n_rows: int = 9, n_cols: int = 9, pitch: float = 100.0):
    """Visium-like hex lattice: every spot has 6 neighbours at distance ``pitch``."""
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(2 * n_cols), indexing="ij")
    keep = (rows + cols) % 2 == 0
    rows, cols = rows[keep], cols[keep]
    xy = np.column_stack([cols * pitch / 2, rows * pitch * np.sqrt(3) / 2])
    return xy, rows, cols


def centre_index(xy):
    return int(np.argmin(((xy - xy.mean(0)) ** 2).sum(1)))


def test_hex_lattice_has_six_equidistant_neighbours():
    xy, _, _ = hex_patch()
    nbrs = _refine._spatial_neighbours(xy, 6)
    c = centre_index(xy)
    assert np.allclose(np.linalg.norm(xy[nbrs[c]] - xy[c], axis=1), 100.0)


def test_single_mislabelled_spot_in_uniform_hex_patch_is_corrected():
    xy, _, _ = hex_patch()
    labels = np.zeros(len(xy), dtype=int)
    c = centre_index(xy)
    labels[c] = 3
    refined = tl.refine_labels(labels, xy, k=10)
    assert np.all(refined == 0)
    # the input is not modified
    assert labels[c] == 3


def test_straight_domain_boundary_on_hex_survives():
    xy, rows, _ = hex_patch(n_rows=12)
    labels = (rows >= 6).astype(int)  # two horizontal bands
    assert np.array_equal(tl.refine_labels(labels, xy, k=6), labels)


def test_votes_never_cross_samples_with_identical_coordinates():
    xy, _, _ = hex_patch()
    n = len(xy)
    c = centre_index(xy)
    a = np.zeros(n, dtype=int)
    a[c] = 1  # sample A: all 0 but the centre
    b = np.ones(n, dtype=int)  # sample B, same coordinates: all 1
    labels = np.concatenate([a, b])
    coords = np.vstack([xy, xy])
    groups = np.repeat(["A", "B"], n)
    refined = tl.refine_labels(labels, coords, groups, k=10)
    assert np.all(refined[:n] == 0)
    assert np.all(refined[n:] == 1)
    # pooled (no groups), the duplicated coordinates would mix the samples
    pooled = tl.refine_labels(labels, coords, None, k=10)
    assert not np.array_equal(pooled, refined)


def test_samples_interleaved_in_input_order():
    xy, _, _ = hex_patch(5, 5)
    n = len(xy)
    coords = np.repeat(xy, 2, axis=0)  # A, B, A, B, ... at the same positions
    groups = np.tile([1, 0], n)
    labels = np.tile([7, 2], n)
    labels[0] = 2  # one wrong spot in sample 1
    refined = tl.refine_labels(labels, coords, groups, k=6)
    assert np.array_equal(refined, np.tile([7, 2], n))


@pytest.mark.parametrize("k", [4, 8])
def test_square_lattice(k):
    g = np.arange(7)
    xy = np.array([(x, y) for y in g for x in g], dtype=float)
    labels = np.where(xy[:, 0] < 3, 0, 1)
    flip = 3 * 7 + 5  # row 3, column 5: inside the right domain
    labels[flip] = 0
    refined = tl.refine_labels(labels, xy, k=k)
    assert refined[flip] == 1
    expected = np.where(xy[:, 0] < 3, 0, 1)
    assert np.array_equal(refined, expected)


def test_irregular_points_noise_is_reduced():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1000, size=(4000, 2))
    truth = (xy[:, 0] > 500).astype(int) + 2 * (xy[:, 1] > 500)
    noisy = truth.copy()
    flip = rng.random(4000) < 0.1
    noisy[flip] = rng.integers(0, 4, flip.sum())
    err_before = np.mean(noisy != truth)
    err_after = np.mean(tl.refine_labels(noisy, xy, k=10) != truth)
    assert err_before > 0.06
    assert err_after < err_before / 3


def test_tie_rules_exact_values():
    # on a line with k = 2 every spot sees three different labels: its own is kept
    line = np.column_stack([np.arange(3.0), np.zeros(3)])
    assert tl.refine_labels(np.array([1, 0, 2]), line, k=2).tolist() == [1, 0, 2]
    # a majority among self + neighbours wins
    five = np.column_stack([np.arange(5.0), np.zeros(5)])
    assert tl.refine_labels(np.array([0, 0, 1, 0, 0]), five, k=2).tolist() == [0, 0, 0, 0, 0]
    # tie not involving the own label: the smallest tied label wins
    plus = np.array([[0, 0], [0, 1], [0, -1], [1, 0], [-1, 0]], dtype=float)
    refined = tl.refine_labels(np.array([2, 5, 5, 3, 3]), plus, k=4)
    assert refined[0] == 3


def test_small_groups_use_group_size_minus_one():
    coords = np.array([[0, 0], [1, 0], [2, 0], [50, 50], [0, 0], [1, 0]], dtype=float)
    groups = np.array(["a", "a", "a", "b", "c", "c"])
    labels = np.array([4, 1, 4, 9, 2, 3])
    # group a (3 spots, k -> 2): middle spot sees 4, 4 -> 4; group b (1 spot) unchanged;
    # group c (2 spots, k -> 1): two-way ties keep each own label
    assert tl.refine_labels(labels, coords, groups, k=10).tolist() == [4, 4, 4, 9, 2, 3]


def test_duplicate_coordinates_exclude_self():
    coords = np.zeros((3, 2))
    assert tl.refine_labels(np.array([0, 1, 1]), coords, k=2).tolist() == [1, 1, 1]


def test_string_labels_are_kept_as_strings():
    xy, _, _ = hex_patch(5, 5)
    labels = np.full(len(xy), "WM", dtype=object)
    labels[centre_index(xy)] = "L1"
    refined = tl.refine_labels(labels, xy)
    assert set(refined.tolist()) == {"WM"}


def test_chunked_vote_equals_unchunked(monkeypatch):
    rng = np.random.default_rng(1)
    xy = rng.uniform(size=(500, 2))
    labels = rng.integers(0, 5, 500)
    full = tl.refine_labels(labels, xy, k=7)
    monkeypatch.setattr(_refine, "_CHUNK", 37)
    assert np.array_equal(tl.refine_labels(labels, xy, k=7), full)


def _two_sample_adata():
    xy, _, _ = hex_patch()
    n = len(xy)
    c = centre_index(xy)
    labels = np.array(["0"] * n + ["1"] * n, dtype=object)
    labels[c] = "2"
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"s{i}" for i in range(2 * n)]))
    adata.obs["sample"] = np.repeat(["A", "B"], n)
    adata.obs["pca_domain"] = pd.Categorical(labels, categories=["0", "1", "2", "3"])
    adata.obsm["spatial"] = np.vstack([xy, xy])
    return adata, n, c


def test_refine_wrapper_writes_refined_categorical():
    adata, n, c = _two_sample_adata()
    assert tl.refine(adata, key="pca_domain") is None
    out = adata.obs["pca_domain_refined"]
    assert list(out.cat.categories) == ["0", "1", "2", "3"]
    assert out.iloc[:n].eq("0").all() and out.iloc[n:].eq("1").all()
    assert adata.obs["pca_domain"].iloc[c] == "2"  # input untouched
    rec = adata.uns["spatlas"]["refinement"]["pca_domain_refined"]
    assert rec["k"] == 10 and rec["sample_key"] == "sample"
    assert rec["fraction_changed"] == pytest.approx(1 / (2 * n))
    tl.refine(adata, key="pca_domain", sample_key=None, key_added="pooled", k=6)
    assert "pooled" in adata.obs


def test_refine_wrapper_errors():
    adata, _, _ = _two_sample_adata()
    with pytest.raises(
        SpatlasInputError, match=r"'harmony_domain' are not in adata.obs.*pca_domain"
    ):
        tl.refine(adata, key="harmony_domain")
    with pytest.raises(SpatlasInputError, match=r"'xy' are not in adata\.obsm"):
        tl.refine(adata, key="pca_domain", spatial_key="xy")
    with pytest.raises(SpatlasInputError, match="sample column 'slide'"):
        tl.refine(adata, key="pca_domain", sample_key="slide")
    with pytest.raises(SpatlasInputError, match="positive integer"):
        tl.refine(adata, key="pca_domain", k=0)
    adata.obs.loc[adata.obs_names[0], "pca_domain"] = np.nan
    with pytest.raises(SpatlasInputError, match="1 missing labels"):
        tl.refine(adata, key="pca_domain")
    coords = np.zeros((3, 2))
    coords[1, 0] = np.nan
    with pytest.raises(SpatlasInputError, match="NaN or infinite values for 1 spots"):
        tl.refine_labels(np.array([0, 1, 1]), coords)
    with pytest.raises(SpatlasInputError, match="one entry per label"):
        tl.refine_labels(np.array([0, 1, 1]), np.zeros((3, 2)), np.array([0, 1]))
