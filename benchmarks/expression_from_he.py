"""Expression from the H&E image on her2st (issue 18): leave-one-section / -patient-out.

The her2st sections with an H&E image in ``../shared/data/her2st/images``: patient A's A1 and A2
(2,000 px images, pixel = pixel_x * 2000 / width), patient B's B4 and patient C's C2-C6 (full
resolution, a spot about 145 px). For every held-out section (LOSO, 8 folds) and every held-out
patient (LOPO, 3 folds) a predictor is fitted on the other sections only
(:func:`spatlas.tl.fit_expression_predictor`: the 250 most variable genes of the training
sections, per-slide feature scaling, ridge with the penalty chosen by CV grouped by training
section) and scored on the held-out section: per gene Pearson r of predicted vs measured
log-normalised expression; the mean over the top 50 and top 250 genes and the number of genes with
r > 0.3 (of 250).

Rows: random-weight EfficientNet-Lite0 (floor), handcrafted, ImageNet EfficientNet-Lite0 (the
``vision`` extra's real weights), the latter also after Macenko stain normalisation; each raw and
after ``rank_align`` (trained on the training sections only; held-out patches embedded by its EMA
teacher).

    python benchmarks/expression_from_he.py            # about 20 min on the 2-core machine
    python benchmarks/expression_from_he.py --extractors handcrafted --schemes loso

Image features are cached in ``benchmarks/.cache`` (delete to re-extract). Torch runs with one
thread.
"""

from __future__ import annotations

import argparse
import resource
import time

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

import spatlas
from morphology import HER2ST, her2st_cohort, lite0_weights
from spatlas import _keys as K
from spatlas._settings import settings

from _common import CACHE, RESULTS, markdown_table, peak_rss_mb

SECTIONS = ["A1", "A2", "B4", "C2", "C3", "C4", "C5", "C6"]
EXTRACTORS = {
    "efficientnet_lite0 (random, floor)": ("timm:efficientnet_lite0", "random", None),
    "handcrafted": ("handcrafted", None, None),
    "efficientnet_lite0 (ImageNet)": ("timm:efficientnet_lite0", "lite0", None),
    "efficientnet_lite0 (ImageNet) + macenko": ("timm:efficientnet_lite0", "lite0", "macenko"),
}
SLUG = {
    "efficientnet_lite0 (random, floor)": "lite0_random",
    "handcrafted": "handcrafted",
    "efficientnet_lite0 (ImageNet)": "lite0",
    "efficientnet_lite0 (ImageNet) + macenko": "lite0_macenko",
}


def cohort() -> ad.AnnData:
    """The eight sections with their images and raw counts (all 18,758 genes)."""
    adata = her2st_cohort(SECTIONS)
    raw = ad.read_h5ad(HER2ST / "her2st_patientsA-E_counts.h5ad")
    raw = raw[adata.obs_names]
    adata = ad.AnnData(
        X=sp.csr_matrix(raw.X, dtype=np.float32),
        obs=adata.obs.assign(patient=raw.obs["patient"].astype(str).to_numpy()),
        var=pd.DataFrame(index=raw.var_names.astype(str)),
        obsm=dict(adata.obsm),
        uns=adata.uns,
    )
    return adata


def features(adata: ad.AnnData, name: str) -> tuple[np.ndarray, float]:
    """Image features of every spot (cached), and the seconds the extraction took."""
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"expr_he_{SLUG[name]}.npy"
    seconds_file = path.with_suffix(".seconds")
    if path.exists():
        return np.load(path), float(seconds_file.read_text())
    extractor, weights, stain = EXTRACTORS[name]
    weights = lite0_weights() if weights == "lite0" else weights
    start = time.perf_counter()
    spatlas.pp.morphology_features(
        adata, extractor=extractor, weights=weights, stain_norm=stain, device="cpu", seed=0
    )
    seconds = time.perf_counter() - start
    X = np.asarray(adata.obsm[K.MORPH_FEATURES], dtype=np.float32)
    np.save(path, X)
    seconds_file.write_text(f"{seconds:.1f}")
    return X, seconds


def folds(adata: ad.AnnData, scheme: str) -> list[tuple[str, list[str]]]:
    """(fold name, held-out sections)."""
    if scheme == "loso":
        return [(s, [s]) for s in SECTIONS]
    patients = adata.obs.groupby(K.SAMPLE, observed=True)["patient"].first()
    return [
        (f"patient {p}", [s for s in SECTIONS if patients[s] == p])
        for p in pd.unique(patients[SECTIONS])
    ]


# benchmark row name -> fit_expression_predictor settings
ALIGNERS = {
    "none": {"aligner": "none"},
    "rank_align (+ features)": {"aligner": "rank_align", "aligner_features": "both"},
    "rank_align (aligned only)": {"aligner": "rank_align", "aligner_features": "aligned"},
}


def run(
    extractors: list[str], schemes: list[str], aligners: list[str], seed: int, append: bool
) -> None:
    settings.n_threads = 1
    wall, cpu = time.perf_counter(), time.process_time()
    adata = cohort()
    print(
        f"cohort: {adata.n_obs} spots x {adata.n_vars} genes, {len(SECTIONS)} sections", flush=True
    )
    fold_rows, gene_rows = [], []
    for name in extractors:
        X, extract_s = features(adata, name)
        adata.obsm[K.MORPH_FEATURES] = X
        print(f"{name}: {X.shape[1]} features ({extract_s:.0f} s)", flush=True)
        for scheme in schemes:
            for fold, held in folds(adata, scheme):
                for aligner in aligners:
                    start = time.perf_counter()
                    predictor = spatlas.tl.fit_expression_predictor(
                        adata,
                        genes=250,
                        exclude_samples=held,
                        **ALIGNERS[aligner],
                        seed=seed,
                        device="cpu",
                        progress=False,
                    )
                    spatlas.tl.predict_expression(adata, predictor, samples=held)
                    table = spatlas.tl.expression_correlation(adata, samples=held)
                    seconds = time.perf_counter() - start
                    summary = spatlas.tl.correlation_summary(table)
                    for _, row in summary.iterrows():
                        fold_rows.append(
                            {
                                "features": name,
                                "aligner": aligner,
                                "scheme": scheme,
                                "fold": fold,
                                "held_out": row["sample"],
                                "spots": int((adata.obs[K.SAMPLE] == row["sample"]).sum()),
                                "mean_r_top50": row["mean_r_top50"],
                                "mean_r_top250": row["mean_r_top250"],
                                "n_genes_r>0.3": row["n_genes_r>0.3"],
                                "alpha": predictor.alpha,
                                "cv_r": predictor.info["cv"]["cv_r_at_alpha"],
                                "seconds": round(seconds, 1),
                            }
                        )
                        print(fold_rows[-1], flush=True)
                    gene_rows.append(table.assign(features=name, aligner=aligner, scheme=scheme))
    per_fold = pd.DataFrame(fold_rows)
    folds_csv = RESULTS / "expression_from_he_folds.csv"
    genes_csv = RESULTS / "expression_from_he_genes.csv.gz"
    gene_rows = [pd.concat(gene_rows, ignore_index=True)]
    if append and folds_csv.exists():  # keep the rows of the combinations not rerun
        keys = ["features", "aligner", "scheme"]
        old = pd.read_csv(folds_csv)
        done = set(map(tuple, per_fold[keys].drop_duplicates().to_numpy()))
        keep = ~pd.Series([tuple(r) in done for r in old[keys].to_numpy()], index=old.index)
        per_fold = pd.concat([old.loc[keep], per_fold], ignore_index=True)
        old_genes = pd.read_csv(genes_csv)
        keep = ~pd.Series(
            [tuple(r) in done for r in old_genes[keys].to_numpy()], index=old_genes.index
        )
        gene_rows.insert(0, old_genes.loc[keep])
        order = {name: i for i, name in enumerate(EXTRACTORS)}
        rank = {name: i for i, name in enumerate(ALIGNERS)}
        per_fold = per_fold.sort_values(
            ["features", "scheme", "aligner"],
            key=lambda c: (
                c.map(order)
                if c.name == "features"
                else (c.map(rank) if c.name == "aligner" else c.map({"loso": 0, "lopo": 1}))
            ),
            kind="stable",
        )
    per_fold.to_csv(folds_csv, index=False, float_format="%.4f")
    genes = pd.concat(gene_rows, ignore_index=True)
    genes.to_csv(genes_csv, index=False, float_format="%.4f")
    summary = (
        per_fold.groupby(["scheme", "features", "aligner"], sort=False)
        .agg(
            **{
                "mean r top 50": ("mean_r_top50", "mean"),
                "mean r top 250": ("mean_r_top250", "mean"),
                "genes r>0.3 (of 250)": ("n_genes_r>0.3", "mean"),
                "sections": ("held_out", "count"),
                "fit+predict s": ("seconds", "sum"),
            }
        )
        .reset_index()
    )
    summary.to_csv(RESULTS / "expression_from_he.csv", index=False, float_format="%.4f")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    load = open("/proc/loadavg").read().split()[:3]
    text = [
        "## Expression from H&E on her2st: leave-one-section-out and leave-one-patient-out",
        "",
        "`python benchmarks/expression_from_he.py`",
        "",
        "Sections A1, A2 (patient A, 2,000 px images), B4 (patient B) and C2-C6 (patient C), "
        f"{adata.n_obs} spots. Per held-out section: Pearson r of predicted vs measured "
        "log-normalised expression of each of the 250 most variable genes of the training "
        "sections; the table averages the per-section means over the held-out sections "
        "(LOPO: each patient's sections predicted by a model fitted on the other patients).",
        "",
        markdown_table(summary),
        "Per held-out section (LOSO):",
        "",
        markdown_table(
            per_fold.loc[per_fold["scheme"] == "loso"]
            .pivot_table(
                index=["features", "aligner"], columns="held_out", values="mean_r_top50", sort=False
            )
            .reset_index()
        ),
        f"Whole run: {wall:.0f} s wall, {cpu:.0f} s CPU (user {usage.ru_utime:.0f} s + system "
        f"{usage.ru_stime:.0f} s), peak RSS {peak_rss_mb():.0f} MB, load average at the end "
        f"{' '.join(load)}; feature extraction cached in benchmarks/.cache (timed on first use).",
        "",
    ]
    (RESULTS / "expression_from_he.md").write_text("\n".join(text))
    print("\n".join(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--extractors", nargs="+", default=list(EXTRACTORS), choices=list(EXTRACTORS)
    )
    parser.add_argument("--schemes", nargs="+", default=["loso", "lopo"], choices=["loso", "lopo"])
    parser.add_argument("--aligners", nargs="+", default=list(ALIGNERS), choices=list(ALIGNERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the earlier rows (results/expression_from_he_folds.csv) of the "
        "combinations not run now",
    )
    args = parser.parse_args()
    run(args.extractors, args.schemes, args.aligners, args.seed, args.append)


if __name__ == "__main__":
    main()
