"""Batch-correction baselines on real data: none / harmony / scanorama / scvi x refine off / on.

DLPFC donor Br8100 (151673-76 integrated jointly, K = 7) and her2st patients A-E (27 sections
integrated jointly; metrics on the annotated A1, B1, C1, D1, E1 without 'undetermined', K = 6).
Paper preprocessing once per dataset (cached), then each method in its own process so that its
wall time and peak memory are its own. Reports ARI per annotated sample, their mean (the
headline), pooled ARI, NMI, iLISI, kBET, seconds (integration + clustering + refinement) and
peak RSS.

    python benchmarks/baselines.py                       # all datasets and methods
    python benchmarks/baselines.py --datasets her2st --methods none harmony
    python benchmarks/baselines.py --scvi-epochs 100     # cap scVI's epochs (default: its own rule)

The committed table comes from ``python benchmarks/baselines.py --scvi-epochs 100`` (scvi-tools'
own rule asks for 400 epochs here: about 17 s an epoch on her2st on this 2-core machine).

Writes benchmarks/results/baselines.csv and baselines.md (rows of other datasets / methods already
in the CSV are kept, so methods can be run separately).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import pandas as pd

from _common import CACHE, DATASETS, RESULTS, load_dataset, markdown_table, peak_rss_mb

METHODS = ["none", "harmony", "scanorama", "scvi"]


def preprocess(dataset: str, seed: int) -> tuple[str, float]:
    """Paper preprocessing of a dataset, cached as h5ad; returns (path, seconds)."""
    import spatlas
    from spatlas import _keys as K

    path = CACHE / f"{dataset}_pp_seed{seed}.h5ad"
    if path.exists():
        return str(path), float("nan")
    start = time.perf_counter()
    adata = load_dataset(dataset)
    spatlas.pp.preprocess_expression(adata, seed=seed)
    seconds = time.perf_counter() - start
    # keep what the methods read (PCs, HVG counts for scVI) so their peak memory is their own
    slim = adata[:, adata.var[K.HVG].to_numpy()].copy()
    slim.X = None
    CACHE.mkdir(exist_ok=True)
    spatlas.io.write_h5ad(slim, path)
    return str(path), seconds


def worker(path: str, dataset: str, method: str, seed: int, scvi_epochs: int | None) -> None:
    """One method on one preprocessed dataset; prints one JSON line per refine setting."""
    import anndata as ad

    import spatlas
    from spatlas import _keys as K

    adata = ad.read_h5ad(path)
    rss_loaded = peak_rss_mb()
    info = DATASETS[dataset]
    params = {"max_epochs": scvi_epochs} if method == "scvi" and scvi_epochs else {}
    start = time.perf_counter()
    if method == "none":
        basis = K.PCA
    else:
        basis = spatlas.pp.integrate(adata, method=method, seed=seed, **params)
    integrate_s = time.perf_counter() - start
    spatlas.tl.cluster(adata, basis=basis, n_clusters=info["k"], seed=seed, key_added="domain")
    cluster_s = time.perf_counter() - start
    spatlas.tl.refine(adata, key="domain", key_added="domain_refined")
    refine_s = time.perf_counter() - start
    for refine, key, seconds in (("off", "domain", cluster_s), ("on", "domain_refined", refine_s)):
        table = spatlas.metrics.evaluate(
            adata,
            cluster_key=key,
            embedding_key=basis,
            exclude_labels=tuple(info["exclude"]),
            seed=seed,
        ).set_index("sample")
        row = {
            "dataset": dataset,
            "method": method,
            "refine": refine,
            "settings": (f"max_epochs={scvi_epochs or 'auto'}" if method == "scvi" else ""),
            **{f"ARI {s}": table.loc[s, "ari"] for s in info["annotated"]},
            "ARI mean": table.loc["mean", "ari"],
            "ARI pooled": table.loc["all", "ari"],
            "NMI mean": table.loc["mean", "nmi"],
            "iLISI": table.loc["all", "ilisi"],
            "kBET": table.loc["all", "kbet"],
            "seconds": round(seconds, 1),
            "integrate s": round(integrate_s, 1),
            "peak MB": round(peak_rss_mb()),
            "MB after load": round(rss_loaded),
        }
        print("ROW " + json.dumps(row), flush=True)


def write_markdown(table: pd.DataFrame, seed: int) -> None:
    """``baselines.md``: one table per dataset from the rows of ``baselines.csv``."""
    parts = []
    for dataset, sub in table.groupby("dataset", sort=False):
        sub = sub.dropna(axis=1, how="all").drop(columns=["dataset"])
        if "settings" in sub:
            sub["settings"] = sub["settings"].fillna("")
        per_sample = [f"ARI {s}" for s in DATASETS[dataset]["annotated"]]
        first = ["method", "refine", *per_sample]
        sub = sub[first + [c for c in sub.columns if c not in first]]
        parts.append(f"### {dataset} (seed {seed})\n\n" + markdown_table(sub))
    (RESULTS / "baselines.md").write_text("\n".join(parts))
    print("\n".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scvi-epochs", type=int, default=None)
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each method this many times and check the labels' metrics are identical",
    )
    parser.add_argument(
        "--render", action="store_true", help="rewrite baselines.md from baselines.csv"
    )
    parser.add_argument("--worker", nargs=3, metavar=("PATH", "DATASET", "METHOD"))
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, seed=args.seed, scvi_epochs=args.scvi_epochs)
        return
    if args.render:
        write_markdown(pd.read_csv(RESULTS / "baselines.csv"), args.seed)
        return

    rows = []
    for dataset in args.datasets:
        path, pp_seconds = preprocess(dataset, args.seed)
        print(f"{dataset}: preprocessed in {pp_seconds:.1f} s -> {path}", flush=True)
        for method in args.methods:
            cmd = [sys.executable, __file__, "--worker", path, dataset, method]
            cmd += ["--seed", str(args.seed)]
            if args.scvi_epochs:
                cmd += ["--scvi-epochs", str(args.scvi_epochs)]
            runs = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{dataset}/{method} failed")
                found = [
                    json.loads(x[4:]) for x in proc.stdout.splitlines() if x.startswith("ROW ")
                ]
                for row in found:
                    row["process s"] = round(time.perf_counter() - start, 1)
                runs.append(found)
            for other in runs[1:]:
                same = all(
                    a[c] == b[c]
                    for a, b in zip(runs[0], other, strict=True)
                    for c in a
                    if c.startswith(("ARI", "NMI", "iLISI", "kBET"))
                )
                print(f"  {method}: repeated run identical: {same}", flush=True)
                if not same:
                    raise SystemExit(f"{dataset}/{method}: same seed gave different metrics")
            for row in runs[0]:
                rows.append(row)
                print(
                    f"  {method:9s} refine {row['refine']:3s} ARI mean {row['ARI mean']:.3f} "
                    f"pooled {row['ARI pooled']:.3f} iLISI {row['iLISI']:.3f} "
                    f"{row['seconds']:.1f} s {row['peak MB']} MB",
                    flush=True,
                )
    table = pd.DataFrame(rows)
    RESULTS.mkdir(exist_ok=True)
    csv = RESULTS / "baselines.csv"
    if csv.exists():  # keep earlier results of the other datasets / methods
        old = pd.read_csv(csv)
        done = set(zip(table["dataset"], table["method"], strict=True))
        keep = [(d, m) not in done for d, m in zip(old["dataset"], old["method"], strict=True)]
        table = pd.concat([old.loc[keep], table], ignore_index=True)
        order = {m: i for i, m in enumerate(METHODS)}
        table = table.sort_values(
            ["dataset", "method", "refine"], key=lambda c: c.map(order) if c.name == "method" else c
        )
    table.to_csv(csv, index=False, float_format="%.6f")
    write_markdown(table, args.seed)


if __name__ == "__main__":
    main()
