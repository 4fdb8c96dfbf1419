import pandas as pd
import pytest
import yaml

from spatlas import _keys as K
from spatlas._config import load_config
from spatlas._errors import ConfigError, SpatlasInputError
from spatlas.cli import main
from spatlas.pipeline import run

from spaceranger_fixtures import SOURCE, make_spaceranger


@pytest.fixture(scope="module")
def cohort_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    f1, _, _ = make_spaceranger(root / "a", "v1_h5", n_spots=400, n_genes=150)
    f2, _, _ = make_spaceranger(root / "b", "v2_mtx", n_spots=400, n_genes=150)
    (root / "annotations.csv").write_bytes((SOURCE / "annotations.csv").read_bytes())
    rows = [
        {
            "sample": "A",
            "donor": "D1",
            "path": str(f1),
            "annotations": "annotations.csv",
            "label_column": "layer",
        },
        {
            "sample": "B",
            "donor": "D2",
            "path": str(f2),
            "annotations": "annotations.csv",
            "label_column": "layer",
        },
    ]
    pd.DataFrame(rows).to_csv(root / "samples.csv", index=False)
    config = {
        "seed": 0,
        "data": {"sheet": "samples.csv"},
        "preprocessing": {"n_top_genes": 100, "n_comps": 10},
        "clustering": {"method": "kmeans", "n_clusters": 5},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root / "config.yaml"


def test_run_writes_the_run_folder(cohort_config, tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(cohort_config), "--out", str(out)]) == 0
    for name in (
        "config.yaml",
        "cohort.h5ad",
        "domains.csv",
        "metrics.csv",
        "timings.csv",
        "run.log",
    ):
        assert (out / name).exists(), name
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["data"]["sheet"] == str(cohort_config.parent / "samples.csv")
    assert resolved["clustering"]["n_clusters"] == 5
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["sample"].tolist() == ["A", "B", "mean", "all"]
    assert metrics.loc[metrics["sample"] == "mean", "ari"].iloc[0] == pytest.approx(
        metrics.loc[metrics["sample"].isin(["A", "B"]), "ari"].mean()
    )
    domains = pd.read_csv(out / "domains.csv")
    # the default pipeline: augmented expression, no Harmony on top, no refinement
    assert domains["spatial_domain"].nunique() == 5
    assert resolved["augmentation"]["enabled"] is True
    assert "step evaluate done" in (out / "run.log").read_text()
    assert not list(tmp_path.glob(".run.partial-*"))


def test_same_seed_gives_identical_labels_and_metrics(cohort_config):
    config = load_config(cohort_config)
    first, second = run(config), run(config)
    assert first.domain_key == "spatial_domain"
    pd.testing.assert_series_equal(
        first.adata.obs["spatial_domain"], second.adata.obs["spatial_domain"]
    )
    pd.testing.assert_frame_equal(first.metrics, second.metrics)
    other = run(load_config(cohort_config, ["seed=5"]))
    assert other.adata.uns[K.UNS]["preprocessing"]["seed"] == 5


def test_overrides_change_the_config(cohort_config):
    config = load_config(
        cohort_config,
        [
            "clustering.n_clusters=3",
            "clustering.refine=false",
            "preprocessing.n_comps=8",
            "augmentation.enabled=false",
        ],
    )
    result = run(config)
    assert result.adata.obs["harmony_domain"].nunique() == 3
    assert "harmony_domain_unrefined" not in result.adata.obs
    assert result.adata.obsm[K.PCA].shape[1] == 8


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("method", ["none", "scanorama"])
def test_integration_method_is_chosen_by_name(cohort_config, method, augment):
    overrides = [f"integration.method={method}", f"augmentation.enabled={str(augment).lower()}"]
    result = run(load_config(cohort_config, overrides))
    basis = K.SPATIAL_PCA if augment else K.PCA
    key = (
        ("spatial_domain" if augment else "pca_domain") if method == "none" else f"{method}_domain"
    )
    assert result.domain_key == key
    assert result.adata.obs[key].nunique() == 5
    if method != "none":
        assert result.adata.obsm[f"{basis}_{method}"].shape == result.adata.obsm[basis].shape


def test_refine_and_augmentation_settings_are_checked_before_running(cohort_config):
    for override, match in (
        ("clustering.refine=maybe", "true, false or auto"),
        ("augmentation.lam=2", "augmentation.lam"),
        ("augmentation.normalisation=vst", "augmentation.normalisation"),
    ):
        with pytest.raises(ConfigError, match=match):
            run(load_config(cohort_config, [override]))


def test_failed_run_leaves_existing_folder_untouched(cohort_config, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    config = load_config(cohort_config, ["preprocessing.n_comps=100000"])
    with pytest.raises(SpatlasInputError):
        run(config, out=out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_overwrite_replaces_only_after_success(cohort_config, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    run(load_config(cohort_config), out=out, overwrite=True)
    assert not (out / "old.txt").exists()
    assert (out / "cohort.h5ad").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["clustering.n_cluster=3"], "did you mean 'n_clusters'"),
        (["clustering.refine=3"], "clustering.refine"),
        (["nokey"], "expected key=value"),
        (["preprocessing=3"], "expected a mapping"),
    ],
)
def test_bad_overrides_are_reported(cohort_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(cohort_config, overrides)


def test_data_section_needs_exactly_one_source(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  dataset: dlpfc_demo\n  sheet: x.csv\n")
    with pytest.raises(ConfigError, match="exactly one of"):
        run(load_config(tmp_path / "c.yaml"))
