"""Atlas scale: ``spatlas run`` on 10 k, 100 k, 1 M (and 5 M with ``--large``) spots (issue 14).

Each row is one synthetic cohort of 20 samples (5 donors x 4), written to ``.h5ad`` and run
through the CLI in a fresh process under ``/usr/bin/time -v`` (wall, CPU seconds and peak RSS of
the whole run, load, preprocessing, integration, the model, clustering, evaluation, the report
and writing included). Per step, seconds and the peak RSS so far come from the run's
``timings.csv``; the planted-domain ARI (mean per sample) and NMI from its ``metrics.csv``.

Cohorts: :func:`spatlas.datasets.synthetic_cohort` (planted domains, donor / sample effects,
no images) on ``--informative`` genes, joined by background genes up to ``--genes`` in all: each
spot draws a Poisson number of background counts (mean ``--background`` times its relative
depth) spread over the background genes by fixed log-normal shares, as the many lowly
expressed genes of a real panel. Layouts: ``hex`` (Visium spots) and ``square`` (Visium HD
bins). The 5 M row (``--large``) is five copies of the 1 M cohort as new samples and donors
(100 samples of 50,000 spots), each with its counts binomially thinned (p = 0.9); it goes
through ``data.streaming: auto`` like any cohort too large for memory.

Pipeline: Harmony + ``grid_ae`` + K-Means (K = 5) + refinement, the issue's setting
(``augmentation.enabled: false``). Run one benchmark at a time on an idle machine::

    python benchmarks/scale.py                      # 10k, 100k, 1M; hex + square; 18k genes
    python benchmarks/scale.py --sizes 100000 1000000 --layouts hex
    python benchmarks/scale.py --large              # adds 5M
    python benchmarks/scale.py --reuse              # keep generated cohorts / finished runs

Results: ``benchmarks/results/scale.md`` / ``scale.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, RESULTS

WORK = CACHE / "scale"
N_SAMPLES = 20  # 5 donors x 4 samples


def background_counts(
    depth: np.ndarray, n_genes: int, mean_counts: float, rng: np.random.Generator
):
    """CSR counts (spots x ``n_genes``) of lowly expressed background genes.

    Spot ``i`` draws ``Poisson(mean_counts * depth_i)`` counts, each landing on gene ``g`` with a
    fixed log-normal share ``p_g``: sparse by construction (never a dense spots x genes array).
    """
    import scipy.sparse as sp

    share = np.exp(np.random.default_rng(12345).normal(0.0, 1.5, n_genes))
    cum = np.cumsum(share / share.sum())
    cum[-1] = 1.0
    totals = rng.poisson(mean_counts * depth)
    rows = np.repeat(np.arange(depth.size, dtype=np.int32), totals)
    cols = np.searchsorted(cum, rng.random(rows.size)).astype(np.int32)
    X = sp.csr_matrix(
        (np.ones(rows.size, dtype=np.float32), (rows, cols)), shape=(depth.size, n_genes)
    )
    X.sum_duplicates()
    return X


def make_cohort(
    path: Path,
    *,
    n_spots: int,
    lattice: str,
    n_genes: int,
    informative: int,
    background: float,
    seed: int = 0,
) -> dict:
    """Write the cohort to ``path`` (atomically); returns its size figures.

    The counts are written row chunk by row chunk (h5py), so a 5 M-spot cohort never exists
    in memory with its background genes.
    """
    import anndata as ad
    import h5py
    import scipy.sparse as sp

    import spatlas

    start = time.perf_counter()
    adata = spatlas.datasets.synthetic_cohort(
        n_donors=5,
        n_samples_per_donor=N_SAMPLES // 5,
        n_spots=max(n_spots // N_SAMPLES, 50),
        n_genes=informative,
        lattice=lattice,
        image=False,
        library_size=500.0,
        seed=seed,
    )
    X = adata.X.tocsr()
    n_bg = max(n_genes - informative, 0)
    var = pd.DataFrame(
        {"domain_marker": [*adata.var["domain_marker"], *[""] * n_bg]},
        index=[*adata.var_names, *[f"bg_{g:05d}" for g in range(n_bg)]],
    )
    shell = ad.AnnData(obs=adata.obs, var=var, obsm={"spatial": adata.obsm["spatial"]})
    shell.uns = adata.uns
    del adata
    tmp = path.with_suffix(".tmp.h5ad")
    shell.write_h5ad(tmp)
    totals = np.asarray(X.sum(axis=1)).ravel()
    depth = totals / totals.mean()
    rng = np.random.default_rng([seed, 14])
    nnz = total_counts = 0
    with h5py.File(tmp, "a") as f:
        if "X" in f:
            del f["X"]
        group = f.create_group("X")
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.array([X.shape[0], len(var)], dtype=np.int64)
        data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype="f4", chunks=True)
        indices = group.create_dataset(
            "indices", shape=(0,), maxshape=(None,), dtype="i4", chunks=True
        )
        indptr = [np.zeros(1, dtype=np.int64)]
        for first in range(0, X.shape[0], 100_000):
            rows = slice(first, min(first + 100_000, X.shape[0]))
            block = X[rows]
            if n_bg:
                bg = background_counts(depth[rows], n_bg, background, rng)
                block = sp.hstack([block, bg], format="csr", dtype=np.float32)
            block.sort_indices()
            size = block.nnz
            data.resize((nnz + size,))
            indices.resize((nnz + size,))
            data[nnz:] = block.data.astype(np.float32)
            indices[nnz:] = block.indices.astype(np.int32)
            indptr.append(block.indptr[1:].astype(np.int64) + nnz)
            nnz += size
            total_counts += float(block.data.sum())
        group.create_dataset("indptr", data=np.concatenate(indptr))
    tmp.replace(path)
    info = {
        "spots": int(X.shape[0]),
        "genes": len(var),
        "nnz": int(nnz),
        "counts_per_spot": round(total_counts / X.shape[0], 1),
        "generate_s": round(time.perf_counter() - start, 1),
        "file_gb": round(path.stat().st_size / 2**30, 2),
    }
    path.with_suffix(".json").write_text(json.dumps(info))
    return info


def replicate_cohort(source: Path, path: Path, copies: int, seed: int = 0) -> dict:
    """A cohort of ``copies`` x the source's spots: each copy is new samples and donors.

    Copy ``c`` renames the samples and donors (``c{c}_...``) and draws its counts by binomial
    thinning (p = 0.9) of the source's, so the copies share the layouts and planted domains
    but not the noise. Written row chunk by row chunk (the 5 M-spot cohort never exists in
    memory; simulating 5 M spots directly would need about 20 GB).
    """
    import anndata as ad
    import h5py

    start = time.perf_counter()
    src = ad.read_h5ad(source, backed="r")
    obs_parts, spatial = [], []
    for c in range(copies):
        obs = src.obs.copy()
        obs.index = [f"c{c}_{name}" for name in src.obs_names]
        for key in ("sample", "donor"):
            obs[key] = [f"c{c}_{v}" for v in src.obs[key].astype(str)]
        obs_parts.append(obs)
        spatial.append(np.asarray(src.obsm["spatial"]))
    obs = pd.concat(obs_parts)
    uns = {
        "spatial": {
            f"c{c}_{k}": v for c in range(copies) for k, v in dict(src.uns["spatial"]).items()
        }
    }
    shell = ad.AnnData(obs=obs, var=src.var.copy(), obsm={"spatial": np.vstack(spatial)})
    shell.uns = uns
    n_src, n_genes = src.shape
    src.file.close()
    tmp = path.with_suffix(".tmp.h5ad")
    shell.write_h5ad(tmp)
    del shell, obs, obs_parts
    rng = np.random.default_rng([seed, 15])
    nnz = 0
    total_counts = 0.0
    with h5py.File(source, "r") as fin, h5py.File(tmp, "a") as f:
        if "X" in f:
            del f["X"]
        group = f.create_group("X")
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.array([n_src * copies, n_genes], dtype=np.int64)
        data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype="f4", chunks=True)
        indices = group.create_dataset(
            "indices", shape=(0,), maxshape=(None,), dtype="i4", chunks=True
        )
        src_ptr = fin["X/indptr"][:].astype(np.int64)
        indptr = [np.zeros(1, dtype=np.int64)]
        for _ in range(copies):
            for first in range(0, n_src, 100_000):
                last = min(first + 100_000, n_src)
                lo, hi = int(src_ptr[first]), int(src_ptr[last])
                values = fin["X/data"][lo:hi]
                cols = fin["X/indices"][lo:hi]
                thinned = rng.binomial(values.astype(np.int64), 0.9).astype(np.float32)
                keep = thinned > 0
                rows = np.repeat(np.arange(last - first), np.diff(src_ptr[first : last + 1]))
                counts = np.bincount(rows[keep], minlength=last - first)
                size = int(keep.sum())
                data.resize((nnz + size,))
                indices.resize((nnz + size,))
                data[nnz:] = thinned[keep]
                indices[nnz:] = cols[keep]
                indptr.append(nnz + np.cumsum(counts))
                nnz += size
                total_counts += float(thinned.sum())
        group.create_dataset("indptr", data=np.concatenate(indptr).astype(np.int64))
    tmp.replace(path)
    n = n_src * copies
    info = {
        "spots": int(n),
        "genes": int(n_genes),
        "nnz": int(nnz),
        "counts_per_spot": round(total_counts / n, 1),
        "generate_s": round(time.perf_counter() - start, 1),
        "file_gb": round(path.stat().st_size / 2**30, 2),
    }
    path.with_suffix(".json").write_text(json.dumps(info))
    return info


CONFIG = """\
seed: 0
data:
  h5ad: {h5ad}
  sample_key: sample
  donor_key: donor
  label_column: label
augmentation: {{enabled: false}}
integration: {{method: harmony}}
model: {{name: grid_ae}}
clustering: {{method: kmeans, n_clusters: 5}}
"""


def _time_v(stderr: str) -> dict:
    """Wall, CPU seconds and peak RSS from ``/usr/bin/time -v``'s report."""

    def field(label: str) -> str:
        match = re.search(rf"{re.escape(label)}: (.+)", stderr)
        return match.group(1).strip() if match else "nan"

    wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    parts = [float(p) for p in wall.split(":")] if wall != "nan" else [float("nan")]
    seconds = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    return {
        "wall_s": round(seconds, 1),
        "cpu_s": round(
            float(field("User time (seconds)")) + float(field("System time (seconds)")), 1
        ),
        "peak_gb": round(float(field("Maximum resident set size (kbytes)")) / 2**20, 2),
    }


def run_one(h5ad: Path, out: Path, name: str) -> dict:
    """``spatlas run`` on one cohort in a fresh process; the row of the results table."""
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.yaml"
    config.write_text(CONFIG.format(name=name, h5ad=h5ad))
    load = os.getloadavg()[0]
    cmd = ["/usr/bin/time", "-v", "spatlas", "run", str(config), "--out", str(out / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (out / "stderr.log").write_text(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: spatlas run failed:\n{proc.stderr[-3000:]}")
    row = {"load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}
    row.update(_time_v(proc.stderr))
    run_dir = out / "run"
    steps = pd.read_csv(run_dir / "timings.csv")
    for step in steps.itertuples():
        row[f"{step.step}_s"] = round(step.seconds, 1)
        row[f"{step.step}_peak_gb"] = round(step.peak_rss_mb / 1024, 2)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    mean = metrics.loc[metrics["sample"] == "mean"].iloc[0]
    row["ari_mean"] = round(float(mean["ari"]), 4)
    row["nmi_mean"] = round(float(mean["nmi"]), 4)
    for col in ("batch_metric_spots", "asw_spots"):
        if col in metrics:
            row[col] = int(metrics.loc[metrics["sample"] == "all", col].iloc[0])
    report = run_dir / "report.html"
    row["report_mb"] = round(report.stat().st_size / 2**20, 2) if report.exists() else float("nan")
    model = json.loads((run_dir / "model" / "model.json").read_text())
    row["device"] = model["train_params"].get("device_used", "?")
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--large", action="store_true", help="add 5,000,000 spots")
    parser.add_argument("--layouts", nargs="+", default=["hex", "square"])
    parser.add_argument("--genes", type=int, default=18_000)
    parser.add_argument("--informative", type=int, default=500)
    parser.add_argument("--background", type=float, default=150.0)
    parser.add_argument("--reuse", action="store_true", help="reuse cohorts and finished runs")
    parser.add_argument("--tag", default="", help="suffix of the results files")
    args = parser.parse_args(argv)
    sizes = sorted(set(args.sizes + ([5_000_000] if args.large else [])))
    WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    for layout in args.layouts:
        for n in sizes:
            name = f"{layout}_{n}_{args.genes}g"
            h5ad = WORK / f"{name}.h5ad"
            if not (args.reuse and h5ad.exists()) and n >= 5_000_000:
                source = WORK / f"{layout}_1000000_{args.genes}g.h5ad"
                if not source.exists():
                    make_cohort(
                        source,
                        n_spots=1_000_000,
                        lattice=layout,
                        n_genes=args.genes,
                        informative=args.informative,
                        background=args.background,
                    )
                info = replicate_cohort(source, h5ad, copies=n // 1_000_000)
            elif not (args.reuse and h5ad.exists()):
                info = make_cohort(
                    h5ad,
                    n_spots=n,
                    lattice=layout,
                    n_genes=args.genes,
                    informative=args.informative,
                    background=args.background,
                )
            else:
                info = json.loads(h5ad.with_suffix(".json").read_text())
            print(f"{name}: {info}", flush=True)
            done = WORK / name / "row.json"
            if args.reuse and done.exists():
                row = json.loads(done.read_text())
            else:
                row = run_one(h5ad, WORK / name, name)
                done.write_text(json.dumps(row))
            row = {"layout": layout, **info, **row}
            print(row, flush=True)
            rows.append(row)
            table = pd.DataFrame(rows)
            table.to_csv(RESULTS / f"scale{args.tag}.csv", index=False)
    command = "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_markdown(pd.DataFrame(rows), RESULTS / f"scale{args.tag}.md", command.strip())


STEP_ORDER = ("load", "preprocess", "integrate", "model", "cluster", "evaluate", "normalise")


def write_markdown(table: pd.DataFrame, path: Path, command: str) -> None:
    """The results table with the 1 M / 100 k time ratio per layout."""
    import platform

    import spatlas

    lines = [
        "# Atlas scale (issue 14)",
        "",
        f"`{command}`; spatlas {spatlas.__version__}, {os.cpu_count()} cores, "
        f"{platform.machine()}, one run at a time on an otherwise idle machine (load average "
        "before / after each run in the last column). Harmony + `grid_ae` + K-Means (K = 5) + "
        "refinement through `spatlas run`: evaluation, report and writing included. Wall / "
        "CPU s and peak RSS: `/usr/bin/time -v` of the whole CLI process (GiB = 2^30 bytes). "
        "Per step: seconds (peak RSS so far, GiB); `normalise`: the log-normalised X computed "
        "again before writing (cohorts above 33 M values); `other`: wall time outside the "
        "steps (start-up, report).",
        "",
    ]
    steps = [s for s in (*STEP_ORDER, "write") if f"{s}_s" in table]
    head = ["layout", "spots", "genes", "stored counts", "wall s", "CPU s", "peak GiB"]
    head += ["ARI", "NMI", *steps, "other s", "load avg", "device"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in table.to_dict("records"):
        known = sum(r[f"{s}_s"] for s in steps if pd.notna(r.get(f"{s}_s")))
        cells = [
            r["layout"],
            f"{r['spots']:,}",
            f"{r['genes']:,}",
            f"{r['nnz']:,}",
            f"{r['wall_s']:.1f}",
            f"{r['cpu_s']:.1f}",
            f"{r['peak_gb']:.2f}",
            f"{r['ari_mean']:.3f}",
            f"{r['nmi_mean']:.3f}",
        ]
        cells += [
            f"{r[s + '_s']:.1f} ({r[s + '_peak_gb']:.1f})" if pd.notna(r.get(s + "_s")) else "-"
            for s in steps
        ]
        cells += [f"{r['wall_s'] - known:.1f}", f"{r['load_before']}/{r['load_after']}"]
        cells.append(str(r.get("device", "")))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for layout, part in table.groupby("layout", sort=False):
        nominal = part.assign(size=part["spots"].map(lambda n: int(float(f"{n:.1g}"))))
        by = nominal.set_index("size")
        if 100_000 in by.index and 1_000_000 in by.index:
            ratio = by.loc[1_000_000, "wall_s"] / by.loc[100_000, "wall_s"]
            dari = by.loc[1_000_000, "ari_mean"] - by.loc[100_000, "ari_mean"]
            lines.append(
                f"- {layout}: wall time 1 M / 100 k = {ratio:.2f}; ARI 1 M - 100 k = {dari:+.3f}"
            )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
