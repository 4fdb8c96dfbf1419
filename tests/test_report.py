import base64
import logging
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import EllipseCollection
from matplotlib.figure import Figure

from spatlas import pl
from spatlas._config import config_from_dict
from spatlas._errors import SpatlasInputError
from spatlas.cli import main
from spatlas.pipeline import _write_report, run
from spatlas.report import SECTIONS, build_report

TINY_RUN = {
    "seed": 0,
    "data": {
        "dataset": "synthetic",
        "dataset_params": {
            "n_donors": 2,
            "n_samples_per_donor": 1,
            "n_spots": 250,
            "n_genes": 120,
            "n_domains": 4,
            "image": True,
        },
    },
    "preprocessing": {"n_top_genes": 80, "n_comps": 8},
    "clustering": {"method": "kmeans", "n_clusters": 4},
    "model": {"name": "grid_ae", "window": 3, "steps": 20, "params": {"batch_size": 128}},
}
DATA_URI = re.compile(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    result = run(config_from_dict(TINY_RUN), out=out)
    return out, result


def test_run_writes_a_self_contained_report(tiny_run):
    out, result = tiny_run
    page = (out / "report.html").read_text(encoding="utf-8")
    for sid in SECTIONS:
        assert f"<h2 id='{sid}'>" in page, sid
    images = DATA_URI.findall(page)
    assert len(images) == 3  # domains, umap, loss curves
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for data in images)
    assert not re.search(r"(src|href)\s*=\s*['\"]?https?://", page)
    assert "<script" not in page and "<link" not in page
    mean_ari = pd.read_csv(out / "metrics.csv").set_index("sample").loc["mean", "ari"]
    assert f"mean per-sample ARI <b>{mean_ari:.3f}</b>" in page
    assert "obs['grid_ae_domain']" in page and "obsm['X_grid_ae']" in page
    assert "grid_ae training loss" in page
    assert "n_clusters: 4" in page  # the resolved config, escaped in a <pre>
    assert "report.html written" in (out / "run.log").read_text()


def test_report_command_rebuilds_the_report(tiny_run, capsys):
    out, _ = tiny_run
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    page = (out / "report.html").read_text(encoding="utf-8")
    assert all(f"<h2 id='{sid}'>" in page for sid in SECTIONS)
    assert not list(out.glob(".report.html.tmp-*"))


def test_report_without_a_model_says_so(tiny_run, tmp_path):
    out, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "model")
    (copy / "metrics.csv").unlink()
    page = build_report(copy).read_text(encoding="utf-8")
    training = page.split("<h2 id='training'>")[1].split("</section>")[0]
    assert "No model was trained in this run" in training and "<img" not in training
    assert "no <code>metrics.csv</code> in the run folder" in page  # labelled, yet no metrics
    assert "No <code>metrics.csv</code>: the run folder has none" in page
    assert len(DATA_URI.findall(page)) == 2


def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(
        SpatlasInputError, match=r"missing cohort\.h5ad, domains\.csv, timings\.csv"
    ):
        build_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {tmp_path} is not a spatlas run folder: missing cohort.h5ad, domains.csv, "
        "timings.csv"
    ]
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


def test_a_failing_report_is_a_warning_not_a_failed_run(tmp_path, monkeypatch, caplog):
    import spatlas.report

    def broken(run_dir, **_):
        raise RuntimeError("disk full")

    monkeypatch.setattr(spatlas.report, "build_report", broken)
    with caplog.at_level(logging.WARNING, logger="spatlas"):
        _write_report(tmp_path, None)
    assert "report.html not written (RuntimeError: disk full)" in caplog.text


def test_spatial_domains_puts_each_spot_on_its_image_pixel(tiny_run):
    _, result = tiny_run
    adata, key = result.adata, result.domain_key
    fig = pl.spatial_domains(adata, key=key)
    assert isinstance(fig, Figure)
    maps = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in maps] == [
        f"d0_s0: {key}",
        "d0_s0: label",
        f"d1_s0: {key}",
        "d1_s0: label",
    ]
    for ax, sample in zip(maps[::2], ["d0_s0", "d1_s0"], strict=True):
        spatial = adata.uns["spatial"][sample]
        scalef = spatial["scalefactors"]["tissue_hires_scalef"]
        (dots,) = [c for c in ax.collections if isinstance(c, EllipseCollection)]
        expected = adata.obsm["spatial"][(adata.obs["sample"] == sample).to_numpy()] * scalef
        np.testing.assert_allclose(dots.get_offsets(), expected)
        assert len(ax.images) == 1 and ax.yaxis_inverted()
        height, width = spatial["images"]["hires"].shape[:2]
        assert (expected >= 0).all() and (expected[:, 0] < width).all()
        assert (expected[:, 1] < height).all()
    # one colour per domain, the same in both samples
    colours = {}
    for ax, sample in zip(maps[::2], ["d0_s0", "d1_s0"], strict=True):
        (dots,) = [c for c in ax.collections if isinstance(c, EllipseCollection)]
        domains = adata.obs.loc[adata.obs["sample"] == sample, key].astype(str).to_numpy()
        for domain, rgba in zip(domains, dots.get_facecolors(), strict=True):
            assert colours.setdefault(domain, tuple(rgba)) == tuple(rgba)
    assert len(set(colours.values())) == adata.obs[key].nunique()

    plain = pl.spatial_domains(adata, key=key, label_key="absent", image=False, samples=["d1_s0"])
    (ax,) = [ax for ax in plain.axes if ax.get_visible()]
    assert not ax.images and ax.yaxis_inverted()
    with pytest.raises(SpatlasInputError, match="unknown samples nope"):
        pl.spatial_domains(adata, key=key, samples=["nope"])


def test_umap_is_seeded_subsampled_and_skips_missing_columns(tiny_run):
    _, result = tiny_run
    adata = result.adata
    figs = [
        pl.umap(adata, basis="X_grid_ae", color=("sample", "absent", "label"), max_spots=150)
        for _ in range(2)
    ]
    assert all(isinstance(fig, Figure) for fig in figs)
    first, second = ([ax for ax in fig.axes if ax.get_visible()] for fig in figs)
    assert [ax.get_title() for ax in first] == ["sample", "label"]
    points = first[0].collections[0].get_offsets()
    assert points.shape == (150, 2)
    np.testing.assert_array_equal(points, second[0].collections[0].get_offsets())
    with pytest.raises(SpatlasInputError, match="obsm has no 'X_nope'"):
        pl.umap(adata, basis="X_nope")


def test_loss_curves_draw_one_line_per_part():
    history = [
        {"step": float(i), "lr": 1e-3, "total": 2.0 / (i + 1), "rec": 1.0 / (i + 1)}
        for i in range(5)
    ]
    fig = pl.loss_curves(history)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.get_lines()] == ["total", "rec"]
    np.testing.assert_allclose(ax.get_lines()[1].get_ydata(), [1, 1 / 2, 1 / 3, 1 / 4, 1 / 5])
    assert ax.get_yscale() == "log"
    history[-1]["rec"] = 0.0
    assert pl.loss_curves(history).axes[0].get_yscale() == "linear"
    with pytest.raises(SpatlasInputError, match="empty"):
        pl.loss_curves([])
