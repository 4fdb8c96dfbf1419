"""Build the bundled demo cohort (DLPFC donor Br8100) from ../shared/data/dlpfc.

Writes one Space Ranger-style folder per slice (filtered_feature_bc_matrix.h5 on the 1,125 genes
the four slices share, spatial/ positions + scalefactors + lowres image), an annotations.csv per
slice (layer labels, nuclei counts) and a samples.csv sheet, under
src/spatlas/datasets/_data/dlpfc_br8100.

    python tools/make_dlpfc_demo.py [--shared ../shared/data/dlpfc]
"""

from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

import anndata as ad
import pandas as pd

from spatlas.io import write_10x_h5

SAMPLES = ["151673", "151674", "151675", "151676"]
DONOR = "Br8100"
OUT = Path(__file__).resolve().parents[1] / "src/spatlas/datasets/_data/dlpfc_br8100"


def main() -> None:
    """Build the demo folders from the shared DLPFC copy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shared", default=Path(__file__).resolve().parents[2] / "shared/data/dlpfc"
    )
    args = parser.parse_args()
    src = Path(args.shared)
    counts = {
        s: ad.read_h5ad(src / f"counts_banksy_top5000/{s}_top5000_counts.h5ad") for s in SAMPLES
    }
    shared = sorted(set.intersection(*(set(a.var_names) for a in counts.values())))
    nuclei = pd.read_csv(
        src / "dlpfc_histology_nuclei_counts_per_spot.tsv.gz", sep="\t", dtype={"sample": str}
    )
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    rows = []
    for s in SAMPLES:
        a = counts[s][:, shared].copy()
        folder = OUT / s
        (folder / "spatial").mkdir(parents=True)
        write_10x_h5(a, folder / "filtered_feature_bc_matrix.h5", genome="GRCh38")
        positions = pd.read_csv(src / f"spatial/{s}/tissue_positions_list.csv.gz", header=None)
        in_tissue = set(positions.loc[positions[1] == 1, 0])
        assert in_tissue == set(a.obs_names), f"{s}: in-tissue spots differ from the count matrix"
        with gzip.open(folder / "spatial/tissue_positions_list.csv.gz", "wt") as fh:
            positions.to_csv(fh, header=False, index=False)
        for name in ("scalefactors_json.json", "tissue_lowres_image.png"):
            shutil.copy(src / f"spatial/{s}/{name}", folder / "spatial" / name)
        nuc = nuclei.loc[nuclei["sample"] == s].set_index("barcode")["count"]
        ann = pd.DataFrame(
            {
                "barcode": a.obs_names,
                "layer": a.obs["layer_guess_reordered"].astype(str).replace("nan", "").to_numpy(),
                "nuclei_count": nuc.reindex(a.obs_names).to_numpy(),
            }
        )
        ann.to_csv(folder / "annotations.csv", index=False)
        rows.append(
            {
                "sample": s,
                "donor": DONOR,
                "path": s,
                "annotations": f"{s}/annotations.csv",
                "label_column": "layer",
            }
        )
        print(s, a.shape, int(a.X.nnz), "labelled", int((ann["layer"] != "").sum()))
    pd.DataFrame(rows).to_csv(OUT / "samples.csv", index=False)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"{len(shared)} shared genes; {total / 1e6:.2f} MB in {OUT}")


if __name__ == "__main__":
    main()
