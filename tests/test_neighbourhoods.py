import anndata as ad
import numpy as np
import pandas as pd
import pytest

from spatlas import pp
from spatlas._errors import SpatlasInputError


def visium_patch(n_rows: int = 9, n_cols: int = 9):
    """Visium array coordinates: row + col even, columns step 2 within a row."""
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(2 * n_cols), indexing="ij")
    keep = (rows + cols) % 2 == 0
    return np.column_stack([rows[keep], cols[keep]])


def pixel_xy(rc: np.ndarray, pitch: float = 100.0) -> np.ndarray:
    """Pixel centres of Visium array coordinates (hex lattice, neighbours at ``pitch``)."""
    return np.column_stack([rc[:, 1] * pitch / 2, rc[:, 0] * pitch * np.sqrt(3) / 2])


def index_of(rc, row, col):
    return int(np.flatnonzero((rc[:, 0] == row) & (rc[:, 1] == col))[0])


def naive_table(rc, window):
    """Per-spot reference: the hex window in axial coordinates, looked up one cell at a time."""
    h = window // 2
    lookup = {(int(r), int(c)): i for i, (r, c) in enumerate(rc)}
    table = np.full((len(rc), window * window), -1)
    for i, (r, c) in enumerate(rc):
        q = (c - r) // 2
        for a in range(-h, h + 1):
            for b in range(-h, h + 1):
                rr, qq = r + a, q + b
                table[i, (a + h) * window + (b + h)] = lookup.get((rr, 2 * qq + rr), -1)
    return table


def test_layout_detection():
    rc = visium_patch()
    assert pp.detect_layout(rc) == "hex"
    grid = np.array([[x, y] for x in range(5) for y in range(5)])
    assert pp.detect_layout(grid) == "square"
    assert pp.detect_layout(pixel_xy(rc)) == "irregular"


def test_hex_window_cells_are_real_lattice_positions_and_hold_the_six_neighbours():
    rc = visium_patch()
    table, layouts = pp.neighbourhood_table(rc, window=5)
    assert layouts == {"0": "hex"}
    c = index_of(rc, 4, 8)  # an interior spot: its 5 x 5 rhombus lies inside the patch
    assert (table[c] >= 0).all()  # every cell of the window holds a spot
    assert table[c, 12] == c  # the centre cell is the spot itself
    xy = pixel_xy(rc)
    ring1 = table[c, [7, 11, 13, 17, 8, 16]]  # axial (-1,0), (0,-1), (0,1), (1,0), (-1,1), (1,-1)
    assert len(set(ring1.tolist())) == 6
    assert np.allclose(np.linalg.norm(xy[ring1] - xy[c], axis=1), 100.0)
    expected = {index_of(rc, 4, 6), index_of(rc, 4, 10)}
    expected |= {index_of(rc, r, col) for r in (3, 5) for col in (7, 9)}
    assert set(ring1.tolist()) == expected
    # cells further out in the rhombus are further away: ring order of the lattice
    d = np.linalg.norm(xy[table[c]] - xy[c], axis=1).reshape(5, 5)
    assert d[2, 2] == 0 and d[0, 0] > d[1, 1] > 0


def test_hex_table_matches_a_naive_per_spot_lookup():
    rc = visium_patch(7, 8)
    table, _ = pp.neighbourhood_table(rc, window=5)
    np.testing.assert_array_equal(table, naive_table(rc, 5))


def test_square_lattice_window_and_border_mask():
    grid = np.array([[x, y] for x in range(6) for y in range(6)])
    table, layouts = pp.neighbourhood_table(grid, window=3)
    assert layouts == {"0": "square"}
    corner = index_of(grid, 0, 0)
    # row offsets -1 and column offsets -1 fall outside: 5 of 9 cells empty at the corner
    assert (table[corner].reshape(3, 3)[0] == -1).all()
    assert (table[corner].reshape(3, 3)[:, 0] == -1).all()
    assert table[corner, 4] == corner
    assert table[corner, 5] == index_of(grid, 0, 1) and table[corner, 7] == index_of(grid, 1, 0)
    assert (table[corner] >= 0).sum() == 4
    inner = index_of(grid, 3, 3)
    assert (table[inner] >= 0).all()


def test_hex_border_cells_are_masked_not_filled():
    rc = visium_patch()
    table, _ = pp.neighbourhood_table(rc, window=5)
    corner = index_of(rc, 0, 0)
    assert (table[corner] == -1).sum() > 0
    windows, mask = pp.gather_windows(np.ones((len(rc), 2)), table, [corner], fill=0.0)
    assert np.array_equal(mask[0, 0].ravel() == 1, table[corner] >= 0)
    assert np.all(windows[0][:, mask[0, 0] == 0] == 0)


def test_irregular_layout_recovers_a_jittered_lattice():
    rng = np.random.default_rng(0)
    grid = np.array([[x, y] for x in range(8) for y in range(8)], dtype=float)
    xy = grid[:, ::-1] * 50.0 + rng.normal(0, 3.0, grid.shape)  # (x, y) pixels, row = y
    table_irr, layouts = pp.neighbourhood_table(xy, window=3, layout="irregular")
    table_sq, _ = pp.neighbourhood_table(grid.astype(int), window=3, layout="square")
    assert layouts == {"0": "irregular"}
    np.testing.assert_array_equal(table_irr, table_sq)


def test_no_neighbour_crosses_samples():
    rc = visium_patch()
    coords = np.vstack([rc, rc])  # two samples on identical coordinates
    groups = np.repeat(["A", "B"], len(rc))
    table, layouts = pp.neighbourhood_table(coords, groups, window=5)
    assert layouts == {"A": "hex", "B": "hex"}
    n = len(rc)
    a, b = table[:n], table[n:]
    assert ((a == -1) | (a < n)).all()
    assert ((b == -1) | (b >= n)).all()
    np.testing.assert_array_equal(np.where(b >= 0, b - n, -1), a)


def test_gather_windows_matches_a_naive_per_spot_reference():
    rc = visium_patch(6, 6)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(len(rc), 3)).astype(np.float32)
    table, _ = pp.neighbourhood_table(rc, window=3)
    rows = np.array([0, 5, len(rc) - 1])
    windows, mask = pp.gather_windows(X, table, rows, fill=-7.0)
    for k, i in enumerate(rows):
        for cell in range(9):
            r, c = divmod(cell, 3)
            j = table[i, cell]
            expected = X[j] if j >= 0 else np.full(3, -7.0)
            np.testing.assert_array_equal(windows[k, :, r, c], expected)
            assert mask[k, 0, r, c] == (j >= 0)


def test_build_neighbourhoods_writes_table_and_metadata():
    rc = visium_patch()
    obs = pd.DataFrame(
        {"array_row": rc[:, 0], "array_col": rc[:, 1], "sample": "S1"},
        index=[f"s{i}" for i in range(len(rc))],
    )
    adata = ad.AnnData(obs=obs)
    key = pp.build_neighbourhoods(adata, window=3)
    assert key == "neighbourhood_w3"
    assert adata.obsm[key].shape == (len(rc), 9) and adata.obsm[key].dtype == np.int32
    info = adata.uns["spatlas"]["neighbourhoods"][key]
    assert info["layouts"] == {"S1": "hex"} and 0 < info["fraction_filled"] < 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 4}, "odd"),
        ({"window": 0}, "positive odd"),
        ({"layout": "triangular"}, "unknown layout"),
    ],
)
def test_neighbourhood_errors_are_clear(kwargs, message):
    with pytest.raises(SpatlasInputError, match=message):
        pp.neighbourhood_table(visium_patch(), **kwargs)


def test_duplicate_lattice_positions_are_an_error():
    rc = visium_patch()
    with pytest.raises(SpatlasInputError, match="share a lattice position"):
        pp.neighbourhood_table(np.vstack([rc, rc[:1]]), window=3)
