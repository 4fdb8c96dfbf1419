"""Does the image earn its place in the default pipeline? Morphology off vs on (issue 16).

The default pipeline (``spatlas.pipeline``: augmented expression, no integration, K-Means, no
refinement) run with the ``morphology`` section off, and on with handcrafted features
(Reinhard-normalised, PCA 20, Harmony on sample) joining the clustering at the label-free
``clustering.morphology_weight: auto`` (``R² / 2``, see ``spatlas.tl.fuse_morphology``), and at
fixed weights for reference. Data: DLPFC Br8100 (the demo: bundled 600 px lowres images, a spot
~4 px), the two MOB sections with their full-resolution H&E (a spot ~34 px), her2st A1 + A2 with
their 2,000 px images (a spot ~29 px; A1 annotated, K = its 5 classes), the synthetic cohort
(planted morphology). Mean per-sample ARI over K-Means seeds 0-2 (the pipeline seed).

    python benchmarks/morphology_weight.py               # writes results/morphology_weight.md
    python benchmarks/morphology_weight.py mob           # some datasets (table not written)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import DATASETS, RESULTS, load_dataset, markdown_table  # noqa: E402

SEEDS = (0, 1, 2)
DATASETS_HERE = ("dlpfc", "mob", "her2st_a", "synthetic")
FIXED = (0.1, 0.25, 0.5)


def _score(adata, key: str, info: dict, seed: int) -> float:
    """Mean per-sample ARI of K-Means (K of the dataset) on ``obsm[key]``."""
    import spatlas

    spatlas.tl.cluster(adata, basis=key, n_clusters=info["k"], seed=seed, key_added="d")
    table = spatlas.metrics.evaluate(
        adata, cluster_key="d", exclude_labels=tuple(info["exclude"]), seed=0
    ).set_index("sample")
    return float(table.loc["mean", "ari"])


def main() -> None:
    import spatlas
    from spatlas import pipeline
    from spatlas._config import config_from_dict

    datasets = sys.argv[1:] or list(DATASETS_HERE)
    rows = []
    for dataset in datasets:
        info = DATASETS[dataset]
        base = load_dataset(dataset)
        for seed in SEEDS:
            config = config_from_dict(
                {
                    "seed": seed,
                    "clustering": {"n_clusters": info["k"]},
                    "morphology": {"enabled": True, "stain_norm": "reinhard"},
                    "data": {"exclude_labels": info["exclude"]},
                }
            )
            adata = base.copy()
            pipeline.preprocess(config, adata)
            pipeline.morphology_features(config, adata)
            pipeline.morphology_embedding(config, adata)
            basis = pipeline.expression_basis(config)

            def score(key: str, adata=adata, info=info, seed=seed) -> float:
                return _score(adata, key, info, seed)

            row = {"dataset": dataset, "seed": seed, "off": score(basis)}
            key = pipeline.fuse_morphology(config, adata, basis)
            fusion = adata.uns["spatlas"]["fusion"]
            row.update(
                {
                    "R²": fusion["r2"],
                    "auto weight": fusion["weight"],
                    "on (auto)": score(key),
                }
            )
            for weight in FIXED:
                spatlas.tl.fuse_morphology(
                    adata,
                    expression_key=basis,
                    morphology_key=pipeline.morphology_key(config, adata),
                    weight=weight,
                    key_added="X_fixed",
                )
                row[f"on (w {weight})"] = score("X_fixed")
            print(row, flush=True)
            rows.append(row)
    table = pd.DataFrame(rows)
    if sys.argv[1:]:
        print(table.drop(columns="seed").groupby("dataset", sort=False).mean())
        return
    table.to_csv(RESULTS / "morphology_weight.csv", index=False, float_format="%.4f")
    summary = table.drop(columns="seed").groupby("dataset", sort=False).mean().reset_index()
    text = (
        "# Morphology off vs on in the default pipeline (benchmarks/morphology_weight.py)\n\n"
        "Mean per-sample ARI, mean over seeds "
        + ", ".join(map(str, SEEDS))
        + "; `auto weight` = R² / 2 (R²: share of the morphology embedding's within-sample "
        "variance explained by the expression-only domains).\n\n"
        + markdown_table(summary)
        + "\nPer seed: `morphology_weight.csv`.\n"
    )
    (RESULTS / "morphology_weight.md").write_text(text)
    print(text)
    assert np.isfinite(table["off"]).all()


if __name__ == "__main__":
    main()
