"""Bad-input cases of the config class (issue 20), merged into ``bad_inputs.CASES``.

Same form as ``bad_inputs.CASES``: name -> (builder(root) -> CLI argv, a fragment the first
error line must contain). Every one of these is refused before the cohort is even read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

_DATA = "data:\n  dataset: synthetic\n  dataset_params: {n_spots: 200, image: false}\n"


def _config(text: str) -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        path = root / "c.yaml"
        path.write_text(text if text.startswith("data:") else _DATA + text)
        return ["run", str(path), "--out", str(root / "run")]

    return build


_BAD = {
    "config: unknown clustering method": (
        "clustering:\n  method: hdbscan\n",
        "clustering.method must be one of kmeans, gmm, leiden",
    ),
    "config: one cluster": ("clustering:\n  n_clusters: 1\n", "clustering.n_clusters must be"),
    "config: n_clusters a word": (
        "clustering:\n  n_clusters: seven\n",
        "clustering.n_clusters must be a number >= 2, auto or empty",
    ),
    "config: refine_k 0": ("clustering:\n  refine_k: 0\n", "clustering.refine_k must be"),
    "config: even model window": (
        "model:\n  name: grid_ae\n  window: 4\n",
        "model.window must be a positive odd number",
    ),
    "config: model steps 0": ("model:\n  name: grid_ae\n  steps: 0\n", "model.steps must be"),
    "config: unknown model": ("model:\n  name: transformer\n", "model.name must be one of"),
    "config: unknown integration": (
        "integration:\n  method: combat\n",
        "integration.method must be one of",
    ),
    "config: unknown extractor": (
        "morphology:\n  enabled: true\n  extractor: resnet\n",
        "morphology.extractor must be one of",
    ),
    "config: negative patch scale": (
        "morphology:\n  enabled: true\n  patch_scale: -1\n",
        "morphology.patch_scale must be > 0",
    ),
    "config: n_comps 1": ("preprocessing:\n  n_comps: 1\n", "preprocessing.n_comps must be"),
    "config: unknown HVG flavour": (
        "preprocessing:\n  hvg_flavor: magic\n",
        "preprocessing.hvg_flavor must be one of",
    ),
    "config: lam above 1": ("augmentation:\n  lam: 1.5\n", "augmentation.lam must lie in [0, 1]"),
    "config: negative seed": ("seed: -1\n", "seed must be at least 0"),
    "config: unknown join": (
        _DATA + "  join: left\n",
        "data.join must be one of inner, outer",
    ),
    "config: unknown pathway network": (
        "downstream:\n  pathways: progeny_martian\n",
        "neither a bundled network",
    ),
}

CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    name: (_config(text), fragment) for name, (text, fragment) in _BAD.items()
}


def _tune_bad_grid_value(root: Path) -> list[str]:
    path = root / "c.yaml"
    path.write_text(
        _DATA
        + "clustering:\n  n_clusters: 3\ntune:\n  grids:\n    harmony: {}\n"
        + "    clustering:\n      refine_k: [10, 0]\n"
    )
    return ["tune", str(path), "--out", str(root / "search")]


CASES["config: a tune grid value refused before the search"] = (
    _tune_bad_grid_value,
    "clustering.refine_k must be at least 1",
)
