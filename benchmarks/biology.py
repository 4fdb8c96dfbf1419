"""From domains to biology on the real cohorts: conserved markers and pathways per domain.

``spatlas run`` (the default pipeline plus the ``downstream`` section) on

- DLPFC Br8100 (the bundled demo; Ensembl ids, so markers only): the conserved markers of the
  domain that best matches white matter and of the one that best matches layer 1, with the
  Maynard et al. 2021 layer markers the issue names;
- her2st patients A-E (27 sections, gene symbols): conserved markers and PROGENy pathways
  (decoupler ulm); the pathway rows of the domains that best match invasive cancer, immune
  infiltrate and adipose tissue, with the per-sample agreement.

"Best match" is the domain with the largest Jaccard overlap with the label over the annotated
spots (labels are used only to name domains here, never to make them). Timings and peak memory
of the new steps come from the run's ``timings.csv``.

Run: ``python benchmarks/biology.py`` (about 2 minutes); writes ``results/biology.md``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from _common import SHARED, markdown_table

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
WORK = HERE / ".cache" / "biology"

MAYNARD = {  # Maynard et al. 2021 layer markers named in issue 15 (Ensembl -> symbol)
    "ENSG00000197971": "MBP (WM)",
    "ENSG00000123560": "PLP1 (WM)",
    "ENSG00000168314": "MOBP (WM)",
    "ENSG00000131095": "GFAP (L1)",
    "ENSG00000189056": "RELN (L1)",
    "ENSG00000171885": "AQP4 (L1)",
}

CONFIGS = {
    "dlpfc": {
        "data": {"dataset": "dlpfc_demo"},
        "clustering": {"n_clusters": 7},
        "downstream": {"markers": True},
    },
    "her2st": {
        "data": {
            "h5ad": str(SHARED / "her2st" / "her2st_patientsA-E_counts.h5ad"),
            "sample_key": "section",
            "donor_key": "patient",
            "label_column": "label",
            "exclude_labels": ["undetermined"],
        },
        "clustering": {"n_clusters": 6},
        "downstream": {"markers": True, "pathways": "progeny_human"},
    },
}


def run(name: str) -> tuple[Path, float, float]:
    """``spatlas run`` on the dataset's config; returns the folder, wall and CPU seconds."""
    WORK.mkdir(parents=True, exist_ok=True)
    config = WORK / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"seed": 0, **CONFIGS[name]}, sort_keys=False))
    out = WORK / name
    cli = Path(sys.executable).parent / "spatlas"
    start = time.perf_counter()
    before = _children_cpu()
    subprocess.run(
        [str(cli), "run", str(config), "--out", str(out), "--overwrite"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return out, time.perf_counter() - start, _children_cpu() - before


def run_embedding() -> tuple[Path, float, float]:
    """The demo cohort with a scanpy PCA in obsm, run with data.expression_embedding."""
    import scanpy as sc

    import spatlas

    WORK.mkdir(parents=True, exist_ok=True)
    adata = spatlas.datasets.dlpfc_demo()
    norm = adata.copy()
    sc.pp.normalize_total(norm)
    sc.pp.log1p(norm)
    sc.pp.pca(norm, n_comps=50, random_state=0)
    adata.obsm["X_scanpy_pca"] = norm.obsm["X_pca"]
    h5ad = WORK / "dlpfc_with_embedding.h5ad"
    adata.write_h5ad(h5ad)
    CONFIGS["embedding"] = {
        "data": {
            "h5ad": str(h5ad),
            "sample_key": "sample",
            "donor_key": "donor",
            "label_column": "label",
            "expression_embedding": "X_scanpy_pca",
        },
        "clustering": {"n_clusters": 7},
    }
    return run("embedding")


def _children_cpu() -> float:
    import os

    times = os.times()
    return times.children_user + times.children_system


def best_domains(
    domains: pd.DataFrame, key: str, labels: list[str]
) -> dict[str, tuple[str, float]]:
    """Per label: the domain with the largest Jaccard overlap (over annotated spots)."""
    annotated = domains.loc[domains["label"].notna()]
    out = {}
    for label in labels:
        in_label = annotated["label"] == label
        best = ("", -1.0)
        for domain in annotated[key].astype(str).unique():
            in_domain = annotated[key].astype(str) == domain
            jaccard = (in_label & in_domain).sum() / (in_label | in_domain).sum()
            if jaccard > best[1]:
                best = (domain, float(jaccard))
        out[label] = best
    return out


def timing_rows(name: str, folder: Path) -> list[dict]:
    timings = pd.read_csv(folder / "timings.csv")
    rows = []
    for step in ("markers", "pathways"):
        hit = timings.loc[timings["step"] == step]
        if len(hit):
            rows.append(
                {
                    "dataset": name,
                    "step": step,
                    "seconds": float(hit["seconds"].iloc[0]),
                    "peak RSS after (MB)": float(hit["peak_rss_mb"].iloc[0]),
                    "peak RSS before (MB)": float(timings["peak_rss_mb"].iloc[hit.index[0] - 1]),
                }
            )
    return rows


def main() -> None:
    import os

    lines = ["# From domains to biology: conserved markers and pathways on the real cohorts", ""]
    lines += [
        f"`python benchmarks/biology.py`, spatlas default pipeline (seed 0) + `downstream`; "
        f"load average before the runs {os.getloadavg()[0]:.2f}.",
        "",
    ]
    timing = []
    # --- DLPFC --------------------------------------------------------------------------
    folder, wall, cpu = run("dlpfc")
    timing += timing_rows("dlpfc", folder)
    domains = pd.read_csv(folder / "domains.csv", dtype={"spatial_domain": str})
    markers = pd.read_csv(folder / "markers.csv", dtype={"domain": str})
    metrics = pd.read_csv(folder / "metrics.csv")
    ari = float(metrics.loc[metrics["sample"] == "mean", "ari"].iloc[0])
    lines += [
        "## DLPFC Br8100 (bundled demo, 4 slices, 1,125 genes)",
        "",
        f"Run: {wall:.1f} s wall, {cpu:.1f} s CPU; domains mean per-sample ARI {ari:.3f}.",
        "",
    ]
    for label in ("WM", "Layer1"):
        domain, jaccard = best_domains(domains, "spatial_domain", [label])[label]
        rows = markers.loc[markers["domain"] == domain]
        n_conserved = int(rows["conserved"].sum())
        top = rows.head(10).copy()
        top["known marker"] = top["gene"].map(MAYNARD).fillna("")
        found = [MAYNARD[g] for g in rows.head(10)["gene"] if g in MAYNARD]
        ranks = {
            MAYNARD[g]: int(r)
            for g, r in zip(rows["gene"], rows["rank"], strict=True)
            if g in MAYNARD and MAYNARD[g].endswith(f"({'WM' if label == 'WM' else 'L1'})")
        }
        lines += [
            f"### Domain {domain}: best match of {label} (Jaccard {jaccard:.2f}); "
            f"{n_conserved} conserved markers",
            "",
            markdown_table(
                top[
                    [
                        "rank",
                        "gene",
                        "known marker",
                        "conserved",
                        "n_up",
                        "n_tested",
                        "z_combined",
                        "mean_log2fc",
                        "frac_in",
                        "frac_out",
                    ]
                ]
            ),
            "",
            f"Known {label} markers in the top 10: {', '.join(found) or 'none'}. "
            f"Rank of each known {label} marker in the domain's list: "
            + ", ".join(f"{k} {v}" for k, v in ranks.items()),
            "",
        ]
    # --- her2st -------------------------------------------------------------------------
    folder, wall, cpu = run("her2st")
    timing += timing_rows("her2st", folder)
    domains = pd.read_csv(folder / "domains.csv", dtype={"spatial_domain": str, "label": str})
    domains.loc[domains["label"].isin(["undetermined", "nan", "NA"]), "label"] = None
    pathways = pd.read_csv(folder / "pathways.csv", dtype={"domain": str})
    markers = pd.read_csv(folder / "markers.csv", dtype={"domain": str})
    metrics = pd.read_csv(folder / "metrics.csv")
    ari = float(metrics.loc[metrics["sample"] == "mean", "ari"].iloc[0])
    labels = ["invasive cancer", "immune infiltrate", "adipose tissue"]
    matches = best_domains(domains, "spatial_domain", labels)
    lines += [
        "## her2st patients A-E (27 sections, 18,758 genes; PROGENy human, decoupler ulm)",
        "",
        f"Run: {wall:.1f} s wall, {cpu:.1f} s CPU; domains mean per-sample ARI {ari:.3f} "
        "(annotated sections A1-E1).",
        "",
    ]
    for label, (domain, jaccard) in matches.items():
        rows = pathways.loc[pathways["domain"] == domain].sort_values("z_combined", ascending=False)
        rows = rows.assign(
            agreement=[
                f"up {u}/{m}" if z > 0 else f"down {d}/{m}"
                for u, d, m, z in zip(
                    rows["n_up"], rows["n_down"], rows["n_tested"], rows["z_combined"], strict=True
                )
            ]
        )
        top_genes = markers.loc[markers["domain"] == domain].head(10)["gene"].tolist()
        lines += [
            f"### Domain {domain}: best match of {label} (Jaccard {jaccard:.2f})",
            "",
            f"Top 10 conserved markers: {', '.join(top_genes)}.",
            "",
            markdown_table(
                rows[
                    [
                        "pathway",
                        "z_combined",
                        "agreement",
                        "conserved",
                        "mean_difference",
                        "mean_activity",
                        "padj_combined",
                    ]
                ]
            ),
            "",
        ]
    composition = pd.crosstab(
        domains.loc[domains["label"].notna(), "spatial_domain"],
        domains.loc[domains["label"].notna(), "label"],
    )
    lines += [
        "### Annotated spots of each label per domain (A1-E1)",
        "",
        markdown_table(composition.reset_index()),
        "",
    ]
    matrix = pathways.pivot(index="domain", columns="pathway", values="z_combined")
    # --- an embedding the user supplies, end to end ----------------------------------------
    folder, wall, cpu = run_embedding()
    metrics = pd.read_csv(folder / "metrics.csv")
    ari = float(metrics.loc[metrics["sample"] == "mean", "ari"].iloc[0])
    lines += [
        "## An expression embedding the user supplies (DLPFC demo)",
        "",
        "`obsm['X_scanpy_pca']`: scanpy's own recipe (normalize_total, log1p, 50 PCs of all "
        "1,125 genes), written into the `.h5ad`, then `spatlas run` with "
        "`data.expression_embedding: X_scanpy_pca` (default augmentation on its columns, "
        "K-Means, K 7).",
        "",
        f"Run: {wall:.1f} s wall, {cpu:.1f} s CPU; mean per-sample ARI {ari:.3f}.",
        "",
        markdown_table(metrics),
        "",
    ]
    lines += [
        "### Domain x pathway (combined z, all domains)",
        "",
        markdown_table(matrix.reset_index()),
        "",
        "## Time and memory of the new steps (from timings.csv)",
        "",
        markdown_table(pd.DataFrame(timing)),
        "",
    ]
    OUT.mkdir(exist_ok=True)
    (OUT / "biology.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
