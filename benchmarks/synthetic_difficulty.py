"""How hard is the default synthetic cohort? Naive PCA + K-Means versus Harmony + K-Means.

Run:  python benchmarks/synthetic_difficulty.py [--seeds 0 1 2] [--layout layers]

Naive: normalize_total 1e4, log1p, scale, PCA 20 on the pooled cohort, K-Means (K = number of
domains, n_init = 10). Harmony: the same PCs corrected with harmonypy on ``sample``, then K-Means.
Prints a markdown table: per-sample ARI, mean of per-sample ARI, pooled ARI, ARI of the naive
clusters against sample and donor id, generation seconds and hires image bytes.
"""

from __future__ import annotations

import argparse
import time

import harmonypy
import numpy as np
import scanpy as sc
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from spatlas import _keys as K
from spatlas.datasets import synthetic_cohort


def pcs_of(adata, seed: int) -> np.ndarray:
    a = adata.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    a.X = a.X.toarray()  # scale centres the genes anyway
    sc.pp.scale(a)
    sc.pp.pca(a, n_comps=20, random_state=seed)
    return a.obsm["X_pca"]


def harmony(pcs: np.ndarray, obs, seed: int) -> np.ndarray:
    z = np.asarray(
        harmonypy.run_harmony(pcs, obs, K.SAMPLE, random_state=seed, verbose=False).Z_corr
    )
    return z if z.shape[0] == pcs.shape[0] else z.T  # older harmonypy returns (dims, n)


def aris(adata, clusters: np.ndarray) -> dict[str, float]:
    label = adata.obs[K.LABEL].to_numpy()
    sample = adata.obs[K.SAMPLE].to_numpy()
    out = {
        s: adjusted_rand_score(label[sample == s], clusters[sample == s])
        for s in adata.obs[K.SAMPLE].cat.categories
    }
    out["mean"] = float(np.mean(list(out.values())))
    out["pooled"] = adjusted_rand_score(label, clusters)
    out["vs sample"] = adjusted_rand_score(sample, clusters)
    out["vs donor"] = adjusted_rand_score(adata.obs[K.DONOR].to_numpy(), clusters)
    return out


def measure(seed: int, **kwargs) -> tuple[dict[str, dict[str, float]], float, int]:
    start = time.perf_counter()
    adata = synthetic_cohort(seed=seed, **kwargs)
    seconds = time.perf_counter() - start
    n_domains = adata.obs[K.LABEL].cat.categories.size
    pcs = pcs_of(adata, seed)
    kmeans = KMeans(n_domains, n_init=10, random_state=seed)
    naive = kmeans.fit_predict(pcs)
    corrected = kmeans.fit_predict(harmony(pcs, adata.obs, seed))
    image_bytes = sum(
        img.nbytes for info in adata.uns[K.SPATIAL].values() for img in info[K.IMAGES].values()
    )
    return {"naive": aris(adata, naive), "harmony": aris(adata, corrected)}, seconds, image_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--layout", default="layers", choices=["layers", "blobs", "mixed"])
    args = parser.parse_args()
    summary = []
    for seed in args.seeds:
        res, seconds, image_bytes = measure(seed, layout=args.layout)
        summary.append((seed, res, seconds, image_bytes))
        columns = list(res["naive"])
        print(
            f"\nseed {seed}, layout {args.layout}: generated in {seconds:.2f} s, "
            f"hires images {image_bytes / 1e6:.1f} MB in all "
            f"({image_bytes / 1e6 / (len(columns) - 4):.1f} MB per sample)\n"
        )
        print("| ARI | " + " | ".join(columns) + " |")
        print("|---|" + "---|" * len(columns))
        for name, row in res.items():
            print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    if len(summary) > 1:
        print(
            "\n| seed | naive mean | naive pooled | naive vs sample | harmony mean "
            "| harmony pooled | seconds | image MB |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for seed, res, seconds, image_bytes in summary:
            naive, harm = res["naive"], res["harmony"]
            print(
                f"| {seed} | {naive['mean']:.3f} | {naive['pooled']:.3f} "
                f"| {naive['vs sample']:.3f} | {harm['mean']:.3f} | {harm['pooled']:.3f} "
                f"| {seconds:.2f} | {image_bytes / 1e6:.1f} |"
            )


if __name__ == "__main__":
    main()
