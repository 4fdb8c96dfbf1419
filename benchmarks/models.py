"""Every fusion model of the registry on the same inputs (GitHub issue 7).

Rows (each run its own process; its wall seconds and peak RSS are its own; three seeds):

- ``harmony``: K-Means on the Harmony PCs (no model);
- ``grid_ae``: Harmony PCs + Harmony morphology PCs -> grid autoencoder;
- ``cross_attention``: the same inputs -> MultiST-style cross-attention model;
- ``rank_align + grid_ae``: ``rank_align`` aligns the Harmony morphology PCs to expression, then
  ``grid_ae`` fuses the Harmony PCs with that aligned morphology (time = both models);
- ``e2e``: **uncorrected** PCs (and uncorrected morphology PCs): no Harmony step at all.

Then K-Means (K = number of annotated domains) + the 10-NN spatial refinement for every row,
and ``spatlas.metrics.evaluate`` on the embedding the clusters came from: ARI per annotated
sample, their mean (headline), pooled ARI, NMI, iLISI and kBET (batch = sample).

Inputs: the paper preprocessing of ``baselines.py`` (cached), Harmony on sample (theta 2, seed
0). Morphology, DLPFC Br8100: the lowres colour statistics + log nuclei count of
``vs_aestetik.py`` (10 features, z-scored, PCA; Harmony on sample for the integrated rows).
her2st A-E: only 8 of 27 sections (and 1 of the 5 annotated ones) have an H&E image, so every
model runs on expression alone there (morphology weight 0; ``cross_attention`` without its
image branch) and ``rank_align``, which aligns morphology, has nothing to align: n/a.

    python benchmarks/models.py                    # both datasets, 3 seeds, reuses cached runs
    python benchmarks/models.py --datasets dlpfc --seeds 0 --recompute

Writes benchmarks/results/models.csv (one row per run) and models.md (mean and sd over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import CACHE, DATASETS, RESULTS, markdown_table, peak_rss_mb  # noqa: E402

RAW = CACHE / "models_raw"
SEEDS = (0, 1, 2)
METHODS = ("harmony", "grid_ae", "cross_attention", "rank_align+grid_ae", "e2e")
# grid_ae-family window: 5 on Visium; 3 on her2st's legacy ST lattice (spots 200 um apart, so a
# 3 x 3 window covers the tissue a 5 x 5 one covers on Visium; as in vs_aestetik.py)
WINDOW = {"dlpfc": 5, "her2st": 3}
MORPHOLOGY_WEIGHT = {"dlpfc": 1.5, "her2st": 0.0}


def prepare(dataset: str, seed: int = 0) -> Path:
    """The arrays every row reads (cached): PCs, Harmony PCs, morphology PCs, coordinates."""
    path = CACHE / f"models_{dataset}_inputs.npz"
    if path.exists():
        return path
    import anndata as ad

    import spatlas
    from baselines import preprocess
    from spatlas import _keys as K
    from vs_aestetik import dlpfc_morphology

    pp_path, _ = preprocess(dataset, seed)
    adata = ad.read_h5ad(pp_path)
    harmony = spatlas.pp.integrate(adata, basis=K.PCA, method="harmony", seed=seed)
    arrays = {
        "pca": np.asarray(adata.obsm[K.PCA], dtype=np.float32),
        "pca_harmony": np.asarray(adata.obsm[harmony], dtype=np.float32),
    }
    if dataset == "dlpfc":
        arrays["morph_harmony"] = dlpfc_morphology(adata, seed)
        arrays["morph_pca"] = np.asarray(adata.obsm["X_morph_pca"], dtype=np.float32)
        lattice = adata.obs[[K.ARRAY_ROW, K.ARRAY_COL]].to_numpy(dtype=np.int64)
    else:
        lattice = adata.obs[["x", "y"]].to_numpy(dtype=np.int64)
    labels = adata.obs[K.LABEL].astype(object).where(adata.obs[K.LABEL].notna(), "")
    CACHE.mkdir(exist_ok=True)
    np.savez(
        path,
        obs_names=adata.obs_names.to_numpy().astype(str),
        sample=adata.obs[K.SAMPLE].to_numpy().astype(str),
        donor=adata.obs[K.DONOR].to_numpy().astype(str),
        label=labels.to_numpy().astype(str),
        lattice=lattice,
        spatial=np.asarray(adata.obsm[K.SPATIAL], dtype=np.float64)[:, :2],
        **arrays,
    )
    return path


def _cohort(data) -> object:
    import anndata as ad
    import pandas as pd

    label = np.where(data["label"] == "", None, data["label"]).astype(object)
    obs = pd.DataFrame(
        {
            "sample": pd.Categorical(data["sample"]),
            "donor": pd.Categorical(data["donor"]),
            "label": label,
            "array_row": data["lattice"][:, 0],
            "array_col": data["lattice"][:, 1],
        },
        index=data["obs_names"],
    )
    obsm = {
        "spatial": data["spatial"],
        "X_pca": data["pca"],
        "X_pca_harmony": data["pca_harmony"],
    }
    for key in ("morph_pca", "morph_harmony"):
        if key in data.files:
            obsm[f"X_{key}"] = data[key]
    return ad.AnnData(obs=obs, obsm=obsm)


def worker(dataset: str, method: str, seed: int, out: str) -> None:
    """One row on one dataset with one seed: fit, cluster, refine, evaluate -> ``out`` (JSON)."""
    import spatlas

    data = np.load(prepare(dataset))
    adata = _cohort(data)
    info = DATASETS[dataset]
    k = info["k"]
    has_morph = "X_morph_harmony" in adata.obsm
    common = {"seed": seed, "n_pseudo_labels": k, "progress": False}
    grid = {"window": WINDOW[dataset], "morphology_weight": MORPHOLOGY_WEIGHT[dataset]}
    start = time.perf_counter()
    if method == "harmony":
        basis = "X_pca_harmony"
    elif method == "grid_ae":
        spatlas.models.fit_model(
            adata,
            "grid_ae",
            expression_key="X_pca_harmony",
            morphology_key="X_morph_harmony" if has_morph else None,
            **common,
            **grid,
        )
        basis = "X_grid_ae"
    elif method == "cross_attention":
        spatlas.models.fit_model(
            adata,
            "cross_attention",
            expression_key="X_pca_harmony",
            morphology_key="X_morph_harmony" if has_morph else None,
            **common,
        )
        basis = "X_cross_attention"
    elif method == "rank_align+grid_ae":
        if not has_morph:
            raise SystemExit(2)
        spatlas.models.fit_model(
            adata,
            "rank_align",
            expression_key="X_pca_harmony",
            morphology_key="X_morph_harmony",
            seed=seed,
            progress=False,
        )
        spatlas.models.fit_model(
            adata,
            "grid_ae",
            expression_key="X_pca_harmony",
            morphology_key="X_rank_align",
            **common,
            **grid,
        )
        basis = "X_grid_ae"
    elif method == "e2e":
        spatlas.models.fit_model(
            adata,
            "e2e",
            expression_key="X_pca",
            morphology_key="X_morph_pca" if has_morph else None,
            **common,
            **grid,
        )
        basis = "X_e2e"
    else:
        raise ValueError(method)
    spatlas.tl.cluster(adata, basis=basis, n_clusters=k, seed=seed, key_added="domain_raw")
    spatlas.tl.refine(adata, key="domain_raw", key_added="domain")
    seconds = time.perf_counter() - start
    table = spatlas.metrics.evaluate(
        adata,
        cluster_key="domain",
        embedding_key=basis,
        exclude_labels=tuple(info["exclude"]),
        seed=0,
    ).set_index("sample")
    record = {
        "dataset": dataset,
        "method": method,
        "seed": seed,
        **{f"ARI {s}": float(table.loc[s, "ari"]) for s in info["annotated"]},
        "ARI mean": float(table.loc["mean", "ari"]),
        "ARI pooled": float(table.loc["all", "ari"]),
        "NMI": float(table.loc["mean", "nmi"]),
        "iLISI": float(table.loc["all", "ilisi"]),
        "kBET": float(table.loc["all", "kbet"]),
        "seconds": round(seconds, 1),
        "peak MB": round(peak_rss_mb()),
        "load": round(os.getloadavg()[0], 1),
    }
    Path(out).write_text(json.dumps(record, indent=1))


def run(dataset: str, method: str, seed: int, *, recompute: bool) -> dict | None:
    """One row in its own process (cached under .cache/models_raw)."""
    RAW.mkdir(parents=True, exist_ok=True)
    out = RAW / f"{dataset}_{method}_seed{seed}.json"
    if out.exists() and not recompute:
        return json.loads(out.read_text())
    env = {**os.environ, "SPATLAS_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", dataset, method, str(seed), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode == 2 and method.startswith("rank_align"):
        return None  # no morphology to align on this dataset
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{dataset} {method} seed {seed} failed")
    record = json.loads(out.read_text())
    print(
        f"  {dataset} {method:20s} seed {seed}: ARI mean {record['ARI mean']:.3f} "
        f"iLISI {record['iLISI']:.3f} kBET {record['kBET']:.3f} "
        f"{record['seconds']:.0f} s {record['peak MB']} MB",
        flush=True,
    )
    return record


def summarise(records: list[dict]) -> str:
    import pandas as pd

    df = pd.DataFrame(records)
    lines = ["# Fusion models on the same inputs (benchmarks/models.py)", ""]
    lines.append(
        "Mean over seeds (sd of the headline in brackets); K-Means + 10-NN refinement for every "
        "row; iLISI / kBET on the embedding the clusters came from (batch = sample); seconds = "
        "model(s) + clustering in the run's own process, one torch thread; peak MB = that "
        "process's peak RSS."
    )
    for dataset, part in df.groupby("dataset", sort=False):
        info = DATASETS[dataset]
        cols = [f"ARI {s}" for s in info["annotated"]]
        cols += ["ARI mean", "ARI pooled", "NMI", "iLISI", "kBET", "seconds", "peak MB"]
        rows = []
        for method in METHODS:
            m = part[part["method"] == method]
            if m.empty:
                continue
            row = {"method": method, "seeds": len(m)}
            row.update({c: m[c].mean() for c in cols})
            sd = m["ARI mean"].std(ddof=1) if len(m) > 1 else float("nan")
            row["ARI mean"] = f"{m['ARI mean'].mean():.3f}" + ("" if sd != sd else f" ({sd:.3f})")
            row["seconds"] = round(float(m["seconds"].mean()))
            row["peak MB"] = round(float(m["peak MB"].mean()))
            rows.append(row)
        lines += ["", f"## {dataset}", "", markdown_table(pd.DataFrame(rows))]
        base = part[part["method"] == "harmony"]["ARI mean"].mean()
        for method in METHODS[1:]:
            m = part[part["method"] == method]["ARI mean"]
            if len(m):
                lines.append(f"- {method}: {m.mean() / base:.2f}x Harmony alone's mean ARI")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, dataset, method, seed, out = sys.argv
        worker(dataset, method, int(seed), out)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["dlpfc", "her2st"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--recompute", action="store_true", help="ignore cached runs")
    args = parser.parse_args()
    for dataset in args.datasets:
        prepare(dataset)
    records = []
    for dataset in args.datasets:
        for method in args.methods:
            for seed in args.seeds:
                record = run(dataset, method, seed, recompute=args.recompute)
                if record is not None:
                    records.append(record)
    # the tables hold every cached run of the default grid, not only this call's
    for path in sorted(RAW.glob("*.json")):
        record = json.loads(path.read_text())
        key = (record["dataset"], record["method"], record["seed"])
        if key not in {(r["dataset"], r["method"], r["seed"]) for r in records}:
            records.append(record)
    records.sort(key=lambda r: (r["dataset"] != "dlpfc", METHODS.index(r["method"]), r["seed"]))
    import pandas as pd

    RESULTS.mkdir(exist_ok=True)
    pd.DataFrame(records).to_csv(RESULTS / "models.csv", index=False, float_format="%.6f")
    text = summarise(records)
    (RESULTS / "models.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
