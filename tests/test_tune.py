"""spatlas.tune: donor-grouped splits, the grid search, its backends, resuming, CLI and report."""

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

import spatlas
from spatlas import tune
from spatlas._config import config_from_dict
from spatlas._errors import ConfigError, SpatlasInputError
from spatlas.cli import main


def _obs(groups: dict[str, int]) -> pd.DataFrame:
    """obs of a cohort: ``groups`` maps donor -> number of samples, 3 spots per sample."""
    rows = [
        {"sample": f"{d}_s{i}", "donor": d}
        for d, n in groups.items()
        for i in range(n)
        for _ in range(3)
    ]
    return pd.DataFrame(rows)


# -- splits --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_folds", [None, 2, 3])
def test_multi_donor_no_group_on_both_sides(n_folds):
    obs = _obs({"A": 2, "B": 3, "C": 1, "D": 2, "E": 2})
    folds = tune.donor_splits(obs, task="multi_donor", n_folds=n_folds)
    assert len(folds) == (n_folds or 5)
    held = [g for f in folds for g in f.test_groups]
    assert sorted(held) == ["A", "B", "C", "D", "E"]  # every group is tested exactly once
    donor = obs["donor"].to_numpy()
    for fold in folds:
        assert len(fold.test_sides) == 1  # held-out groups are processed jointly
        assert not set(fold.tune_groups) & set(fold.test_groups)
        assert set(fold.tune_groups) | set(fold.test_groups) == set(donor)
        tune_rows = set(np.flatnonzero(np.isin(donor, fold.tune_groups)))
        test_rows = set(np.flatnonzero(np.isin(donor, fold.test_groups)))
        assert not tune_rows & test_rows
    tune.check_folds(obs, folds, group_key="donor")


def test_single_donor_tests_each_other_group_separately():
    obs = _obs({"Br1": 4, "Br2": 4, "Br3": 4})
    folds = tune.donor_splits(obs, task="single_donor")
    assert [f.tune_groups for f in folds] == [("Br1",), ("Br2",), ("Br3",)]
    assert folds[0].test_sides == (("Br2",), ("Br3",))
    for fold in folds:
        assert fold.tune_groups[0] not in fold.test_groups
    tune.check_folds(obs, folds, group_key="donor")


def test_check_folds_catches_a_leak():
    obs = _obs({"A": 2, "B": 2})
    bad = [tune.Fold(0, ("A", "B"), (("B",),))]
    with pytest.raises(AssertionError, match="both sides"):
        tune.check_folds(obs, bad, group_key="donor")


def test_splits_any_group_key():
    obs = _obs({"D1": 4})
    obs["pair"] = np.where(obs["sample"].isin(["D1_s0", "D1_s1"]), "p1", "p2")
    folds = tune.donor_splits(obs, task="single_donor", group_key="pair")
    assert [f.tune_groups for f in folds] == [("p1",), ("p2",)]


@pytest.mark.parametrize(
    ("groups", "kwargs", "message"),
    [
        ({"A": 3}, {}, "at least 2 groups"),
        ({"A": 2, "B": 1}, {"task": "single_donor"}, "B of 'donor' have one sample"),
        ({"A": 2, "B": 2}, {"n_folds": 3}, "between 2 and the number of groups"),
        ({"A": 2, "B": 2}, {"n_folds": 1}, "between 2 and the number of groups"),
        ({"A": 2, "B": 2}, {"group_key": "patient"}, "'patient' is not an obs column"),
        ({"A": 2, "B": 2}, {"task": "leave_one_out"}, "unknown task"),
        ({"A": 2, "B": 2}, {"task": "single_donor", "n_folds": 2}, "multi_donor task only"),
    ],
)
def test_impossible_splits_say_why(groups, kwargs, message):
    with pytest.raises(SpatlasInputError, match=re.escape(message)):
        tune.donor_splits(_obs(groups), **kwargs)


def test_sample_in_two_groups_is_refused():
    obs = _obs({"A": 2, "B": 2})
    obs.loc[0, "donor"] = "B"
    with pytest.raises(SpatlasInputError, match="A_s0 belong to several"):
        tune.donor_splits(obs)


def test_missing_group_is_refused():
    obs = _obs({"A": 2, "B": 2})
    obs.loc[0, "donor"] = None
    with pytest.raises(SpatlasInputError, match="missing values"):
        tune.donor_splits(obs)


# -- grids ---------------------------------------------------------------------------------------


def test_default_grids_are_table_1():
    assert tune.default_grid("harmony") == {"theta": [0, 0.5, 1, 2, 4, 6, 8]}
    assert tune.default_grid("scanorama") == {"sigma": [10, 15, 20, 25]}
    assert tune.default_grid("scvi") == {"n_layers": [1, 2, 3, 4]}
    assert tune.default_grid("grid_ae") == {
        "morphology_weight": [0, 1, 1.5, 2, 3],
        "window": [5, 7],
    }
    assert tune.default_grid("clustering") == {"refine": [True, False]}
    grid = tune.pipeline_grid(tune.Pipeline("h+g", "harmony", "grid_ae"), {}, morphology=True)
    assert len(tune.grid_points(grid)) == 7 * 5 * 2 * 2
    assert grid[("integration", "params", "theta")] == [0, 0.5, 1, 2, 4, 6, 8]
    assert grid[("model", "window")] == [5, 7]
    # without morphology the weight has no effect and is not searched
    grid = tune.pipeline_grid(tune.Pipeline("h+g", "harmony", "grid_ae"), {}, morphology=False)
    assert ("model", "morphology_weight") not in grid
    assert len(tune.grid_points(grid)) == 7 * 2 * 2


def test_grid_overrides_and_errors():
    p = tune.Pipeline("scanorama", "scanorama")
    grid = tune.pipeline_grid(p, {"scanorama": {"sigma": [15]}, "clustering": {}}, morphology=False)
    assert tune.grid_points(grid) == [{("integration", "params", "sigma"): 15}]
    with pytest.raises(ConfigError, match="non-empty list"):
        tune.pipeline_grid(p, {"scanorama": {"sigma": 15}}, morphology=False)
    with pytest.raises(ConfigError, match="unknown setting 'refined'"):
        tune.pipeline_grid(p, {"clustering": {"refined": [True]}}, morphology=False)


# -- the search ----------------------------------------------------------------------------------


def _search_config(**tune_settings):
    data = {
        "seed": 0,
        "data": {
            "dataset": "synthetic",
            "dataset_params": {
                "n_donors": 3,
                "n_samples_per_donor": 2,
                "n_spots": 300,
                "n_genes": 150,
                "n_domains": 4,
                "image": False,
            },
        },
        "preprocessing": {"n_top_genes": 100, "n_comps": 8},
        "integration": {"method": "harmony"},
        "model": {"name": "grid_ae", "steps": 40, "latent_dim": 8},
        "clustering": {"n_clusters": 4, "refine": True},
        "tune": {
            "grids": {"harmony": {"theta": [0, 2]}, "grid_ae": {"window": [3]}},
            "n_workers": 1,
            **tune_settings,
        },
    }
    return config_from_dict(data)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("tune") / "search"
    threads = torch.get_num_threads()
    result = tune.tune(_search_config(), out=out)  # n_workers=1: tasks run in this process
    assert torch.get_num_threads() == threads  # a task's thread limit does not leak out
    return result, out


def test_search_writes_every_table(searched):
    result, out = searched
    for name in (
        "search.json",
        "config.yaml",
        "splits.csv",
        "trials.csv",
        "chosen.csv",
        "test_scores.csv",
        "summary.csv",
        "tasks.jsonl",
        "report.html",
    ):
        assert (out / name).is_file(), name
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 3 * 2 * 2  # 3 folds x theta {0, 2} x refine {True, False}
    assert set(trials.columns) >= {"integration.theta", "model.window", "clustering.refine"}
    assert trials["composite"].notna().all()
    assert list(result.summary.index) == ["d0", "d1", "d2", "mean"]
    assert result.summary.loc["mean", "harmony+grid_ae"] > 0.3  # planted domains are found


def test_winner_is_best_tuning_composite_and_is_tested_on_held_out_groups(searched):
    result, out = searched
    trials, chosen, test = result.trials, result.chosen, result.test
    splits = pd.read_csv(out / "splits.csv")
    for row in chosen.itertuples():
        part = trials.loc[trials["fold"] == row.fold]
        assert row.tune_composite == pytest.approx(part["composite"].max())
        tuned = set(
            splits.loc[(splits.fold == row.fold) & (splits.role == "tune"), "groups"]
            .iloc[0]
            .split()
        )
        tested = set(test.loc[test["fold"] == row.fold, "group"])
        assert tested and not tuned & tested
        # the trial's tuning side holds only the tuning groups' samples
        assert set(part["side"]) == {"side-" + "+".join(sorted(tuned))}


def test_rerun_resumes_and_recomputes_only_missing_steps(searched, tmp_path):
    _, done = searched
    out = tmp_path / "copy"
    shutil.copytree(done, out)
    lines = (out / "tasks.jsonl").read_text().splitlines()
    first = tune.tune(_search_config(), out=out)  # finished search: nothing to run
    assert (out / "tasks.jsonl").read_text().splitlines() == lines
    # an interrupted search: two score steps and one model step never finished
    scores = sorted((out / "cache" / "score").glob("*.json"))
    models = sorted((out / "cache" / "model").glob("*.npy"))
    removed = [scores[0], scores[1], models[0]]
    for path in removed:
        path.unlink()
    second = tune.tune(_search_config(), out=out)
    new = (out / "tasks.jsonl").read_text().splitlines()[len(lines) :]
    keys = {json.loads(line)["key"] for line in new}
    assert {p.stem for p in removed} <= keys
    # only the removed steps and the scores depending on the removed model are recomputed
    assert len(new) <= 3 + 4
    pd.testing.assert_frame_equal(first.trials, second.trials)
    pd.testing.assert_frame_equal(first.chosen, second.chosen)


def test_gains_skip_near_zero_baselines():
    summary = pd.DataFrame(
        {"harmony": [0.2, 0.01], "harmony+grid_ae": [0.3, 0.05], "scanorama": [0.1, 0.1]},
        index=["A", "B"],
    )
    gains = tune.gains(summary)
    assert list(gains.columns) == ["harmony+grid_ae vs harmony"]
    assert gains.loc["A"].iloc[0] == pytest.approx(0.5)
    assert np.isnan(gains.loc["B"].iloc[0])


def test_resume_on_another_backend_or_worker_count(searched, tmp_path):
    first, done = searched
    out = tmp_path / "copy"
    shutil.copytree(done, out)
    lines = (out / "tasks.jsonl").read_text().splitlines()
    again = tune.tune(_search_config(n_workers=2), out=out)
    assert (out / "tasks.jsonl").read_text().splitlines() == lines  # nothing recomputed
    pd.testing.assert_frame_equal(first.chosen, again.chosen)


def test_same_seed_same_numbers_across_backends_and_workers(searched, tmp_path):
    first, _ = searched
    pooled = tune.tune(_search_config(), out=tmp_path / "pool", n_workers=2)
    pd.testing.assert_frame_equal(first.trials, pooled.trials)
    on_ray = tune.tune(_search_config(), out=tmp_path / "ray", backend="ray", n_workers=2)
    pd.testing.assert_frame_equal(first.chosen, on_ray.chosen)
    pd.testing.assert_frame_equal(first.trials, on_ray.trials)
    pd.testing.assert_frame_equal(first.summary, on_ray.summary)


def test_folder_of_another_search_or_of_user_files_is_refused(searched, tmp_path):
    _, done = searched
    with pytest.raises(SpatlasInputError, match="different config"):
        tune.tune(_search_config(lam=0.5), out=done)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(SpatlasInputError, match="not a spatlas search folder"):
        tune.tune(_search_config(), out=mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_search_needs_a_fixed_k_and_a_known_backend(tmp_path):
    config = _search_config()
    config.clustering.n_clusters = "auto"
    with pytest.raises(ConfigError, match=r"set clustering\.n_clusters"):
        tune.tune(config, out=tmp_path / "a")
    config = _search_config(backend="dask")
    with pytest.raises(ConfigError, match="unknown backend 'dask'"):
        tune.tune(config, out=tmp_path / "b")


def test_single_donor_task_with_morphology(tmp_path):
    config = _search_config(
        task="single_donor",
        grids={
            "harmony": {"theta": [2]},
            "grid_ae": {"morphology_weight": [0, 1.5], "window": [3]},
            "clustering": {"refine": [True]},
        },
    )
    config.data.dataset_params.update(n_donors=2, image=True)
    config.morphology.enabled = True
    config.morphology.n_comps = 5
    result = tune.tune(config, out=tmp_path / "single")
    # each donor is tuned on once and tested on by the other fold
    assert sorted(result.test["group"]) == ["d0", "d1"]
    assert set(result.chosen["tune_groups"]) == {"d0", "d1"}
    tuned = result.chosen.set_index("fold").loc[result.test["fold"], "tune_groups"].to_numpy()
    assert (result.test["group"].to_numpy() != tuned).all()
    # the morphology weight is searched when there is morphology, and it changes the scores
    assert sorted(set(result.trials["model.morphology_weight"])) == [0, 1.5]
    assert result.trials.groupby("fold")["composite"].nunique().min() == 2


def test_benchmark_cli_table_gains_bar_plot_and_report(tmp_path, capsys):
    import yaml

    config = _search_config()
    data = spatlas._config.config_to_dict(config)
    data["benchmark"] = {"methods": ["harmony", "scanorama"], "model": "grid_ae"}
    data["tune"]["grids"]["scanorama"] = {"sigma": [15]}
    data["tune"]["grids"]["clustering"] = {"refine": [True]}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "bench"
    assert main(["benchmark", str(path), "--out", str(out), "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "relative gain" in printed
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == [
        "group",
        "harmony",
        "harmony+grid_ae",
        "scanorama",
        "scanorama+grid_ae",
    ]
    gains = pd.read_csv(out / "gains.csv").set_index("group")
    expected = summary.set_index("group")
    assert gains.loc["mean", "harmony+grid_ae vs harmony"] == pytest.approx(
        expected.loc["mean", "harmony+grid_ae"] / expected.loc["mean", "harmony"] - 1, abs=1e-3
    )
    assert "| mean |" in (out / "summary.md").read_text()
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "report.html").read_text()
    for sid in spatlas.report.SEARCH_SECTIONS:
        assert f"<h2 id='{sid}'>" in page
    assert "data:image/png;base64," in page  # the bar plot is embedded
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").is_file()


def test_benchmark_bars_returns_a_figure():
    summary = pd.DataFrame(
        {"harmony": [0.2, 0.3, 0.25], "harmony+grid_ae": [0.3, 0.35, 0.325]},
        index=pd.Index(["A", "B", "mean"], name="group"),
    )
    fig = spatlas.pl.benchmark_bars(summary)
    ax = fig.axes[0]
    assert len(ax.patches) == 6
    assert [t.get_text() for t in ax.get_xticklabels()] == ["A", "B", "mean"]


def test_model_cache_key_follows_the_model_defaults(monkeypatch):
    from spatlas.models.grid_ae import GridAE
    from spatlas.tune._search import model_cache_key

    section = {"name": "grid_ae", "window": 3, "params": {}}
    key = model_cache_key("abc", section, 5)
    assert key == model_cache_key("abc", dict(section), 5)
    assert key != model_cache_key("abd", section, 5)
    assert key != model_cache_key("abc", {**section, "window": 5}, 5)
    init, train = GridAE.parameters()
    changed = {**train, "pseudo_labels": "global"}
    monkeypatch.setattr(GridAE, "parameters", classmethod(lambda cls: (init, changed)))
    assert model_cache_key("abc", section, 5) != key  # a new default: no stale resume


def test_file_stamp_of_a_folder_follows_its_files(tmp_path):
    from spatlas.tune._inputs import file_stamp

    image = tmp_path / "images" / "he"
    (image / "s0").mkdir(parents=True)
    (image / "s0" / "c").write_bytes(b"abc")
    first = file_stamp(image)
    assert file_stamp(image) == first
    (image / "s0" / "c").write_bytes(b"abcd")  # a chunk rewritten: another size
    assert file_stamp(image) != first
