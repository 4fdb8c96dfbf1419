"""How hard is the synthetic cohort? Naive PCA + K-Means versus Harmony + K-Means, via the pipeline.

    python benchmarks/synthetic_difficulty.py [--seeds 0 1 2] [--layout layers|blobs|mixed]

For each seed: `spatlas.datasets.synthetic_cohort(seed=...)` with its defaults (3 donors x 2
samples, 1,500 spots, 500 genes, 5 planted domains), the paper preprocessing, then K-Means
(K = 5, no refinement) on `X_pca` (naive) and on `X_pca_harmony`. Reports ARI per sample, the mean
of per-sample ARI, pooled ARI, and the ARI of the clusters against sample and donor ids (how much
the clusters follow the batches). Writes benchmarks/results/synthetic_difficulty.{csv,md}.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from spatlas import _keys as K
from spatlas._config import config_from_dict
from spatlas.metrics import ari
from spatlas.pipeline import run

from _common import RESULTS, markdown_table


def measure(seed: int, layout: str, method: str) -> dict:
    config = config_from_dict(
        {
            "seed": seed,
            "data": {"dataset": "synthetic", "dataset_params": {"layout": layout}},
            "integration": {"method": method},
            "clustering": {"method": "kmeans", "refine": False},
        }
    )
    start = time.perf_counter()
    result = run(config)
    seconds = time.perf_counter() - start
    adata, table = result.adata, result.metrics.set_index("sample")
    domains = adata.obs[result.domain_key]
    samples = [s for s in table.index if s not in ("mean", "all")]
    return {
        "seed": seed,
        "embedding": "X_pca (naive)" if method == "none" else "X_pca_harmony",
        **{f"ARI {s}": table.loc[s, "ari"] for s in samples},
        "ARI mean": table.loc["mean", "ari"],
        "ARI pooled": table.loc["all", "ari"],
        "ARI vs sample": ari(adata.obs[K.SAMPLE], domains),
        "ARI vs donor": ari(adata.obs[K.DONOR], domains),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--layout", default="layers", choices=["layers", "blobs", "mixed"])
    args = parser.parse_args()
    rows = [measure(s, args.layout, m) for s in args.seeds for m in ("none", "harmony")]
    table = pd.DataFrame(rows)
    RESULTS.mkdir(exist_ok=True)
    table.to_csv(RESULTS / "synthetic_difficulty.csv", index=False, float_format="%.4f")
    text = f"layout {args.layout}\n\n" + markdown_table(table)
    (RESULTS / "synthetic_difficulty.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
