"""Automatic K on real data: which K does `spatlas.tl.choose_k` pick on each DLPFC Br8100 slice?

Each slice (bundled demo, 7 annotated layers) is preprocessed on its own (paper recipe), then
`choose_k` (stability rule, K in 3..12) picks K on the PCs; ARI with refinement at the chosen K is
compared with ARI at the true K = 7.

    python benchmarks/auto_k.py            # writes benchmarks/results/auto_k.{csv,md}
"""

from __future__ import annotations

import time

import pandas as pd

import spatlas
from spatlas import _keys as K

from _common import RESULTS, markdown_table


def main() -> None:
    cohort = spatlas.datasets.dlpfc_demo()
    rows = []
    for sample in cohort.obs[K.SAMPLE].cat.categories:
        adata = cohort[cohort.obs[K.SAMPLE] == sample].copy()
        spatlas.pp.preprocess_expression(adata, batch_key=None)
        start = time.perf_counter()
        best, scores = spatlas.tl.choose_k(adata.obsm[K.PCA], k_range=range(3, 13), seed=0)
        seconds = time.perf_counter() - start
        row = {"sample": sample, "chosen_k": best, "auto_k_seconds": round(seconds, 1)}
        for name, k in (("chosen", best), ("true7", 7)):
            spatlas.tl.cluster(adata, basis=K.PCA, n_clusters=k, key_added=name)
            spatlas.tl.refine(adata, key=name, key_added=f"{name}_r")
            labelled = adata.obs[K.LABEL].notna().to_numpy()
            row[f"ari_{name}"] = spatlas.metrics.ari(
                adata.obs.loc[labelled, K.LABEL], adata.obs.loc[labelled, f"{name}_r"]
            )
        pairs = zip(scores["k"], scores["stability"], strict=True)
        row["stability"] = " ".join(f"{k}:{s:.2f}" for k, s in pairs)
        rows.append(row)
        print(row, flush=True)
    table = pd.DataFrame(rows)
    RESULTS.mkdir(exist_ok=True)
    table.to_csv(RESULTS / "auto_k.csv", index=False)
    (RESULTS / "auto_k.md").write_text(markdown_table(table))
    print(markdown_table(table))


if __name__ == "__main__":
    main()
