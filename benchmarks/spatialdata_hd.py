"""SpatialData and Visium HD inputs, measured (issue 17).

1. The bundled DLPFC demo cohort is converted to one SpatialData store with ``spatialdata-io``
   (``visium()`` per slice, the cortical layers put into the table's ``obs``, the four slices
   concatenated: one table annotating four regions), and run with the demo's config from sample
   sheet rows pointing at that store. Its per-slice ARIs are compared with ``spatlas demo`` on
   the Space Ranger folders, in the same process environment. The copy of the store the run
   writes is read back and one spot's circle is mapped through its transformations onto the
   lowres image, next to its Space Ranger pixel position.
2. A synthetic Visium-HD-like cohort (:func:`spatlas.datasets.synthetic_visium_hd`: square 8 µm
   bins in Space Ranger's ``binned_outputs/square_008um`` layout) runs through ``spatlas run``
   from the HD folders; wall seconds, CPU seconds and peak RSS of the whole CLI run are taken
   by ``/usr/bin/time``.

Usage: ``python benchmarks/spatialdata_hd.py [--work DIR] [--hd-spots N] [--hd-samples S]``
(needs ``pip install 'spatlas[spatialdata]' spatialdata-io``). Results go to
``benchmarks/results/spatialdata_hd.md``.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

HERE = Path(__file__).resolve().parent
SAMPLES = ["151673", "151674", "151675", "151676"]


def _timed(cmd: list[str], cwd: Path) -> dict:
    """Run a command under /usr/bin/time -v: wall s, CPU s, peak RSS GB."""
    start = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-v", *cmd], cwd=cwd, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode})")
    err = proc.stderr

    def grab(pattern: str) -> float:
        return float(re.search(pattern, err).group(1))

    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(
            grab(r"User time \(seconds\): ([\d.]+)") + grab(r"System time \(seconds\): ([\d.]+)"), 1
        ),
        "peak_rss_gb": round(grab(r"Maximum resident set size \(kbytes\): (\d+)") / 1024**2, 2),
    }


def build_store(work: Path) -> Path:
    """The demo's four slices as one SpatialData store, built as a spatialdata-io user would."""
    import spatialdata as sd
    import spatialdata_io

    from spatlas.datasets import dlpfc_demo_sheet

    src = dlpfc_demo_sheet().parent
    parts = []
    for sample in SAMPLES:
        folder = work / "spaceranger" / sample
        shutil.copytree(src / sample, folder, dirs_exist_ok=True)
        gz = folder / "spatial" / "tissue_positions_list.csv.gz"
        if gz.exists():  # spatialdata-io reads the plain file Space Ranger writes
            with gzip.open(gz) as fin, open(gz.with_suffix(""), "wb") as fout:
                shutil.copyfileobj(fin, fout)
            gz.unlink()
        part = spatialdata_io.visium(folder, dataset_id=sample)
        table = part.tables["table"]
        ann = pd.read_csv(src / sample / "annotations.csv", index_col=0, dtype=str)
        table.obs["layer"] = ann["layer"].reindex(table.obs_names).to_numpy()
        parts.append(part)
    store = work / "dlpfc_br8100.zarr"
    if store.exists():
        shutil.rmtree(store)
    sd.concatenate(parts, concatenate_tables=True).write(store)
    return store


def _step_sum(run: Path) -> dict:
    steps = pd.read_csv(run / "timings.csv")
    return {
        "steps_s": round(float(steps["seconds"].sum()), 1),
        "peak_rss_gb": round(float(steps["peak_rss_mb"].max()) / 1024, 2),
    }


def spatialdata_vs_spaceranger(work: Path, *, reuse: bool = False) -> tuple[pd.DataFrame, dict]:
    from importlib import resources

    store = work / "dlpfc_br8100.zarr"
    if reuse and all((work / n / "metrics.csv").exists() for n in ("run_demo", "run_sd")):
        t_demo, t_sd = _step_sum(work / "run_demo"), _step_sum(work / "run_sd")
        return _compare(work, store, t_demo, t_sd)
    store = build_store(work)
    demo = resources.files("spatlas") / "configs" / "demo.yaml"
    config = yaml.safe_load(demo.read_text())
    config["data"] = {
        "samples": [
            {
                "sample": s,
                "donor": "Br8100",
                "path": str(store),
                "region": s,
                "label_column": "layer",
            }
            for s in SAMPLES
        ]
    }
    (work / "sd.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for name in ("run_sd", "run_demo"):
        shutil.rmtree(work / name, ignore_errors=True)
    t_demo = _timed(["spatlas", "demo", "--out", "run_demo"], work)
    t_sd = _timed(["spatlas", "run", "sd.yaml", "--out", "run_sd"], work)
    return _compare(work, store, t_demo, t_sd)


def _compare(work: Path, store: Path, t_demo: dict, t_sd: dict) -> tuple[pd.DataFrame, dict]:
    a = pd.read_csv(work / "run_demo" / "metrics.csv")
    b = pd.read_csv(work / "run_sd" / "metrics.csv")
    table = pd.DataFrame(
        {
            "sample": a["sample"],
            "ari_spaceranger": a["ari"],
            "ari_spatialdata": b["ari"],
            "nmi_spaceranger": a["nmi"],
            "nmi_spatialdata": b["nmi"],
        }
    )
    d1 = pd.read_csv(work / "run_demo" / "domains.csv")
    d2 = pd.read_csv(work / "run_sd" / "domains.csv")
    key = next(c for c in d1.columns if c.endswith("_domain"))
    check = {
        "identical_domains": bool((d1[key].to_numpy() == d2[key].to_numpy()).all()),
        "demo": t_demo,
        "spatialdata": t_sd,
        **_pixel_check(work / "run_sd" / "spatialdata" / store.name),
    }
    return table, check


def _pixel_check(copy: Path) -> dict:
    """One spot of the written copy: its circle mapped onto the lowres image vs Space Ranger."""
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    import spatlas

    written = sd.read_zarr(copy)
    table = written.tables["spatlas"]
    i = table.n_obs // 2
    region, instance = str(table.obs["region"].iloc[i]), table.obs["instance_id"].iloc[i]
    point = written.shapes[region].loc[instance].geometry
    m_img, m_shp = (
        np.asarray(
            get_transformation(e, to_coordinate_system=region).to_affine_matrix(
                ("x", "y"), ("x", "y")
            )
        )
        for e in (written.images[f"{region}_lowres_image"], written.shapes[region])
    )
    pixel = (np.linalg.inv(m_img) @ m_shp @ [point.x, point.y, 1.0])[:2]
    src = spatlas.datasets.dlpfc_demo_sheet().parent / region
    sr = spatlas.io.read_spaceranger(src, sample=region)
    # spatialdata-io numbers a slice's spots in the count matrix's order, as spatlas reads it
    lowres = sr.uns["spatial"][region]["scalefactors"]["tissue_lowres_scalef"]
    expected = sr.obsm["spatial"][int(instance)] * lowres
    return {
        "table_rows": int(table.n_obs),
        "pixel_spatialdata": pixel.round(3).tolist(),
        "pixel_spaceranger": expected.round(3).tolist(),
        "domains_in_table": sorted(
            map(str, table.obs[table.uns["spatlas"]["domain_key"]].unique())
        ),
    }


def hd_run(work: Path, n_samples: int, n_spots: int, n_genes: int) -> dict:
    import spatlas

    folder = work / f"hd_{n_samples}x{n_spots}"
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    sheet = spatlas.datasets.synthetic_visium_hd(
        folder,
        n_donors=n_samples,
        n_samples_per_donor=1,
        n_spots=n_spots,
        n_genes=n_genes,
        seed=0,
    )
    simulate = time.perf_counter() - start
    config = {"seed": 0, "data": {"sheet": str(sheet)}, "clustering": {"n_clusters": 5}}
    (folder / "hd.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    t = _timed(["spatlas", "run", "hd.yaml", "--out", "run"], folder)
    metrics = pd.read_csv(folder / "run" / "metrics.csv")
    steps = pd.read_csv(folder / "run" / "timings.csv")
    mean = metrics.loc[metrics["sample"] == "mean"].iloc[0]
    return {
        "samples": n_samples,
        "bins": int(metrics.loc[~metrics["sample"].isin(["mean", "all"]), "n_spots"].sum()),
        "genes": n_genes,
        "simulate_s": round(simulate, 1),
        **t,
        "mean_ari": round(float(mean["ari"]), 3),
        "mean_nmi": round(float(mean["nmi"]), 3),
        "steps": "; ".join(f"{r.step} {r.seconds:.1f} s" for r in steps.itertuples()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/spatlas_sd_hd")
    parser.add_argument("--hd-samples", type=int, default=4)
    parser.add_argument("--hd-spots", type=int, default=25000)
    parser.add_argument("--hd-genes", type=int, default=2000)
    parser.add_argument(
        "--reuse", action="store_true", help="compare the DLPFC runs already in --work"
    )
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    import spatialdata
    import spatialdata_io

    table, check = spatialdata_vs_spaceranger(work, reuse=args.reuse)
    hd = hd_run(work, args.hd_samples, args.hd_spots, args.hd_genes)
    out = HERE / "results" / "spatialdata_hd.md"
    lines = [
        "# SpatialData and Visium HD inputs",
        "",
        f"`python benchmarks/spatialdata_hd.py` — spatialdata {spatialdata.__version__}, "
        f"spatialdata-io {spatialdata_io.__version__}; load average at start "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; 2 cores.",
        "",
        "## DLPFC demo: Space Ranger folders vs one SpatialData store (demo config)",
        "",
        table.to_markdown(index=False, floatfmt=".4f"),
        "",
        f"Identical domains, spot by spot: {check['identical_domains']}. "
        f"`spatlas demo`: {check['demo']}; the store: {check['spatialdata']}.",
        "",
        f"Written copy: table `spatlas` with {check['table_rows']} rows, domains "
        f"{', '.join(check['domains_in_table'])}; one spot's circle mapped onto the lowres image "
        f"through the copy's transformations: {check['pixel_spatialdata']}, its Space Ranger "
        f"position x `tissue_lowres_scalef`: {check['pixel_spaceranger']}.",
        "",
        "## Synthetic Visium HD (8 µm bins, binned_outputs/square_008um) through `spatlas run`",
        "",
        pd.DataFrame([hd]).to_markdown(index=False),
        "",
    ]
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
