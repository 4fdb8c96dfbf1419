"""Bad-input cases of the tune class (issue 20), merged into ``bad_inputs.CASES``.

Same form as ``bad_inputs.CASES``: name -> (builder(root) -> CLI argv, a fragment the first
error line must contain). The cases are search folders that a rerun (``spatlas tune``) or
``spatlas report`` must refuse: made from other input data, or holding a damaged state file.
The first two run a real (tiny, ~5 s) search first; the others fake only the files needed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

import spatlas
from spatlas.cli import main


def write_cohort(root: Path, *, seed: int = 0) -> Path:
    """A tiny three-donor cohort ``.h5ad`` (one sample per donor, labels in obs['label'])."""
    adata = spatlas.datasets.synthetic_cohort(
        n_donors=3,
        n_samples_per_donor=1,
        n_spots=200,
        n_genes=120,
        n_domains=3,
        image=False,
        seed=seed,
    )
    path = root / "cohort.h5ad"
    adata.write_h5ad(path)
    return path


def write_config(root: Path, cohort: Path, *, name: str = "tune.yaml", **tune: object) -> Path:
    """A search config on ``cohort``: no integration or model, one grid point (fast)."""
    data = {
        "seed": 0,
        "data": {
            "h5ad": str(cohort),
            "sample_key": "sample",
            "donor_key": "donor",
            "label_column": "label",
        },
        "preprocessing": {"n_top_genes": 80, "n_comps": 8},
        "integration": {"method": "none"},
        "model": {"name": "none"},
        "clustering": {"n_clusters": 3, "refine": False},
        "tune": {"grids": {"clustering": {"refine": [False]}}, "n_workers": 1, **tune},
    }
    path = root / name
    path.write_text(yaml.safe_dump(data))
    return path


def edit_cohort(path: Path, edit: Callable) -> None:
    """Rewrite the cohort ``.h5ad`` at ``path`` after ``edit(adata)``."""
    import anndata as ad

    adata = ad.read_h5ad(path)
    edit(adata)
    adata.write_h5ad(path)


def relabel(adata, n: int = 12) -> None:
    """Give ``n`` spots labelled with the first class the second class (corrected annotations)."""
    labels = adata.obs["label"].astype(str).to_numpy().copy()
    classes = sorted(set(labels))
    labels[np.flatnonzero(labels == classes[0])[:n]] = classes[1]
    adata.obs["label"] = labels


def _searched(root: Path) -> tuple[Path, Path, Path]:
    """A finished search of a tiny cohort: (cohort, config, search folder)."""
    cohort = write_cohort(root)
    config = write_config(root, cohort)
    out = root / "search"
    assert main(["-q", "tune", str(config), "--out", str(out)]) == 0
    return cohort, config, out


def _tune(config: Path, out: Path) -> list[str]:
    return ["tune", str(config), "--out", str(out)]


def labels_changed(root: Path) -> list[str]:
    cohort, config, out = _searched(root)
    edit_cohort(cohort, relabel)
    return _tune(config, out)


def counts_changed(root: Path) -> list[str]:
    cohort, config, out = _searched(root)

    def double(adata) -> None:
        adata.X = adata.X * 2

    edit_cohort(cohort, double)
    return _tune(config, out)


def _fake_search(root: Path, spec_text: str) -> tuple[Path, Path]:
    """A config on a tiny cohort and a search folder whose ``search.json`` is ``spec_text``."""
    config = write_config(root, write_cohort(root))
    out = root / "search"
    (out / "cache").mkdir(parents=True)
    (out / "search.json").write_text(spec_text)
    return config, out


def search_json_truncated(root: Path) -> list[str]:
    config, out = _fake_search(root, '{"kind": "tune", "config": {"seed": 0, "da')
    return _tune(config, out)


def search_json_not_an_object(root: Path) -> list[str]:
    config, out = _fake_search(root, "[]\n")
    return _tune(config, out)


def search_of_another_config(root: Path) -> list[str]:
    spec = {"kind": "tune", "config": {"seed": 1}, "pipelines": [], "folds": [], "inputs": {}}
    config, out = _fake_search(root, json.dumps(spec))
    return _tune(config, out)


def _fake_finished(root: Path) -> Path:
    out = root / "search"
    out.mkdir()
    spec = {"kind": "tune", "config": {}, "pipelines": [], "folds": [], "n_clusters": 3}
    (out / "search.json").write_text(json.dumps(spec))
    return out


def report_of_damaged_search_json(root: Path) -> list[str]:
    out = _fake_finished(root)
    (out / "search.json").write_bytes(b"\x00\x00\x00")  # a file zeroed by a crash
    return ["report", str(out)]


def report_of_damaged_table(root: Path) -> list[str]:
    out = _fake_finished(root)
    (out / "trials.csv").write_text('pipeline,fold,composite\n"harmony,0,0.41\n')  # cut open
    return ["report", str(out)]


CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "tune: rerun after the labels changed": (
        labels_changed,
        "made from different input data (labels changed in 12 spots)",
    ),
    "tune: rerun after the counts changed": (
        counts_changed,
        "made from different input data (the count matrix changed)",
    ),
    "tune: search.json truncated": (search_json_truncated, "its search.json is unreadable"),
    "tune: search.json not an object": (search_json_not_an_object, "(not a JSON object)"),
    "tune: --out holds a search of another config": (
        search_of_another_config,
        "holds a search with a different config",
    ),
    "report: search.json zeroed": (report_of_damaged_search_json, "search.json: unreadable"),
    "report: a search table cut open": (report_of_damaged_table, "trials.csv: unreadable"),
}
