"""Peer tools side by side with spatlas on the same inputs (GitHub issue 16).

Datasets (``_common.DATASETS``: K, annotated samples, excluded label classes): ``dlpfc3837``
(DLPFC Br8100 on the 3,837 shared genes, K = 7), ``dlpfc`` (the demo's 1,125 genes, K = 7),
``her2st`` (patients A-E, K = 6, metrics on A1-E1 without 'undetermined'), ``mob`` (two mouse
olfactory bulb sections, K = 5), ``synthetic`` (``synthetic_cohort(seed=0)``, K = 5).

Every tool reads the same cached cohort (``benchmarks/.cache/peers_<dataset>.h5ad``: raw counts,
``obs`` sample / donor / label / array_row / array_col, ``obsm['spatial']``). Each run is its own
process, one at a time, with one thread (``OMP_NUM_THREADS=1`` etc.; torch / Harmony: 1 thread);
its wall seconds, CPU seconds (user + system, ``os.wait4``) and peak RSS are its own. The peers
run in their own virtual environments (``benchmarks/.venvs/<peer>``, created on first use with
pip). Every peer run exports its embedding; "K-Means + refine" is then, in this process,
``KMeans(K, n_init=10, random_state=seed)`` + spatlas' 10-NN refinement within each sample
(``spatlas.tl._refine.refine_labels``), so representation and clustering are separated. Its
seconds are the peer run's minus the peer's own clustering step plus the K-Means + refinement.
Metrics: ``spatlas.metrics.evaluate`` (ARI per annotated sample, their mean = headline, pooled
ARI over the annotated spots, NMI mean per sample), labels NaN / excluded left out.

Rows (``<tool> <recipe>: <clustering>``):

- ``spatlas default``: the real CLI, ``spatlas run cfg.yaml --out DIR`` with a config
  holding only ``seed``, ``data`` (the cohort as .h5ad incl. its images, sample / donor keys,
  ``exclude_labels``) and ``clustering.n_clusters: K``; so whatever the default pipeline is at
  this commit (the git commit is recorded). Scored from its ``domains.csv``.
- ``spatlas Harmony``: ``pp.preprocess_expression`` (defaults) -> ``pp.integrate(harmony)`` ->
  K-Means + refine (the baseline).
- ``BANKSY lambda 0.2`` / ``lambda 0.8`` (pybanksy; the BANKSY multi-sample DLPFC vignette):
  per-sample union of the top-2,000 HVGs (``seurat_v3`` = Seurat's vst on counts), relative
  counts x 5,000 **without log**, samples staggered in space, ``k_geom`` 18, scaled-Gaussian
  weights, AGF (``max_m`` 1), the z-scored weighted BANKSY matrix -> PCA 20 -> Harmony on sample
  (harmonypy, theta 2) -> (own) Leiden on a 50-NN graph with a resolution search for K clusters;
  (b) K-Means + refine on the Harmony PCs. lambda 0.2 is the vignette's domain setting, 0.8 the
  issue's.
- ``CellCharter Harmony`` / ``CellCharter scVI``: the latent is either Harmony on sample of
  the PCs of log-normalised counts (1e4; 3,000 HVGs seurat_v3 by sample; z-scores; PCA 20) or,
  as in its tutorials, scVI (scvi-tools defaults on the 3,000 HVGs' counts, batch = sample,
  ``early_stopping=True``; at most 15 min) -> ``sq.gr.spatial_neighbors(library_key='sample',
  coord_type='generic', delaunay=True)`` -> ``cc.gr.remove_long_links`` ->
  ``cc.gr.aggregate_neighbors(n_layers=3)`` -> (own) ``cc.tl.Cluster(K)`` (GMM); (b) K-Means +
  refine on the aggregated embedding.
- ``GraphST default`` (graphst-modern, CPU): the samples concatenated with their coordinates
  staggered (its spatial graph never crosses samples), ``GraphST.GraphST(adata,
  random_seed=41 + seed)`` at its defaults (10X mode: its own preprocessing, 3,000 HVGs, dense
  3-NN spot graph, 600 epochs) -> (own) its ``clustering(method='leiden', start=0.1, end=2.0,
  increment=0.01)`` (its tutorials' non-R option; mclust needs R); (b) K-Means + refine on
  ``emb_pca`` (the 20 PCs its clustering uses). Limited to 15 min a run; cohorts of more
  than 8,000 spots are not run (``MAX_SPOTS``: its dense spot graph, see there).
- ``Novae trained from scratch`` (no pretrained weights can be downloaded here):
  ``novae.spatial_neighbors(slide_key='sample', coord_type='generic', delaunay=True,
  percentile=99)`` -> ``novae.Novae(adata)`` -> ``fit(max_epochs=20)`` (its default; early
  stopping) -> ``compute_representations`` -> (own) ``assign_domains(level=K)`` (``n_domains=K``
  where the level gives another count); (b) K-Means + refine on ``novae_latent``.

A peer that fails to install or run gets a row with the reason; the script goes on.

    python benchmarks/peers.py                                   # everything, seed 0
    python benchmarks/peers.py --datasets dlpfc3837 mob --peers banksy cellcharter
    python benchmarks/peers.py --datasets dlpfc --peers banksy --seeds 0 1 2
    python benchmarks/peers.py --tables-only                     # tables from the raw results

Raw results (one JSON per tool, recipe, dataset and seed) under
``benchmarks/results/peers_raw/``, reused unless ``--recompute``; writes
``benchmarks/results/peers.csv`` (one row per run and clustering) and ``peers.md`` (one table per
dataset; mean +- sd over seeds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RAW = RESULTS / "peers_raw"
CACHE = HERE / ".cache"
VENVS = HERE / ".venvs"
WORK = CACHE / "peers_work"

DATASET_ORDER = ("dlpfc3837", "mob", "her2st", "dlpfc", "synthetic")
PEERS = ("spatlas", "banksy", "cellcharter", "graphst", "novae")
RECIPES = {
    "spatlas": ("default", "harmony"),
    "banksy": ("lambda0.2", "lambda0.8"),
    "cellcharter": ("harmony", "scvi"),
    "graphst": ("default",),
    "novae": ("scratch",),
}
# pip installs of each peer's venv, in order (torch first, from the local wheels)
# (pynndescent < 0.7: scanpy 1.11's k-NN graph of > 4,096 spots calls ``getnnz`` on the graph,
# which pynndescent 0.7 returns as a scipy ``csr_array`` that has none)
_NND = "pynndescent<0.7"
VENV_SPECS = {
    "banksy": [["pybanksy", "harmonypy", "scanpy", "leidenalg", "scikit-misc", _NND]],
    "cellcharter": [["torch"], ["cellcharter", "harmonypy", "scikit-misc", "scvi-tools"]],
    "graphst": [["torch"], ["graphst-modern", "leidenalg", "louvain", "scikit-misc", _NND]],
    "novae": [["torch"], ["novae"]],
}
# the distributions whose versions a run records
VERSION_OF = {
    "banksy": ["pybanksy", "harmonypy", "scanpy", "leidenalg"],
    "cellcharter": [
        "cellcharter",
        "squidpy",
        "harmonypy",
        "torchgmm",
        "torch",
        "scanpy",
        "scvi-tools",
    ],
    "graphst": ["graphst-modern", "GraphST", "torch", "scanpy", "leidenalg"],
    "novae": ["novae", "torch", "scanpy"],
}
# GraphST's 10X mode holds several dense (spots x spots) float64 matrices and trains 600 epochs on
# the dense graph: on the synthetic cohort (8,932 spots) it trained 270 of its 600 epochs within
# the 15-minute limit (~3.3 s an epoch, one thread; 4.3 GB). The cost grows with spots squared, so
# larger cohorts are recorded as not run, with the reason.
MAX_SPOTS = {"graphst": 8_000}
SKIP_REASON = {
    "graphst": lambda n: (
        f"GraphST's 10X mode trains 600 epochs on a dense {n} x {n} adjacency "
        f"({n * n * 8 / 1e9:.1f} GB a float64 copy, several held): measured on synthetic "
        "(8,932 spots, one thread) at ~3.3 s an epoch, 270 of 600 epochs in the 15-min limit; "
        f"projected ~{3.3 * (n / 8932) ** 2 * 600 / 60:.0f} min here"
    )
}
MAX_SECONDS = np.inf  # --max-seconds: a lower limit for every run of this invocation
CLI_MAIN = "import sys; from spatlas.cli import main; sys.exit(main())"
TIMEOUT_S = 1800.0  # a run past this is stopped and recorded as such
# the limit for GraphST on CPU (15 min), ~15 min for CellCharter's scVI latent, 25 for Novae
TIMEOUT_PEER = {"graphst": 900.0, ("cellcharter", "scvi"): 900.0, "novae": 1500.0}
THREAD_ENV = {
    name: "1"
    for name in (
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
        "NUMBA_NUM_THREADS",
        "VECLIB_MAXIMUM_THREADS",
    )
}


def row_name(peer: str, recipe: str, clustering: str) -> str:
    tool = {
        "spatlas": "spatlas",
        "banksy": "BANKSY",
        "cellcharter": "CellCharter",
        "graphst": "GraphST",
        "novae": "Novae",
    }[peer]
    pretty = {
        "default": "default",
        "harmony": "Harmony",
        "lambda0.2": "lambda 0.2 + Harmony",
        "lambda0.8": "lambda 0.8 + Harmony",
        "scratch": "trained from scratch",
        "scvi": "scVI",
    }.get(recipe, recipe)
    return f"{tool} {pretty}: {clustering}"


# ---------------------------------------------------------------------------------------------
# workers (each peer's venv: numpy, anndata and the peer; no spatlas)
# ---------------------------------------------------------------------------------------------


def _versions(names: list[str]) -> dict:
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _one_torch_thread() -> None:
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def _staggered(xy: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """Coordinates with the samples side by side along x, far apart (no cross-sample
    neighbours in any k-NN or Delaunay graph a tool builds)."""
    xy = np.asarray(xy, dtype=np.float64)[:, :2].copy()
    span = float(np.ptp(xy, axis=0).max()) + 1.0
    offset = 0.0
    for sample in dict.fromkeys(samples):
        rows = samples == sample
        xy[rows, 0] += offset - xy[rows, 0].min()
        offset = xy[rows, 0].max() + 3 * span
    return xy


def _harmony(pcs: np.ndarray, obs, seed: int) -> np.ndarray:
    import harmonypy

    ho = harmonypy.run_harmony(pcs, obs, "sample", random_state=seed, verbose=False, ncores=1)
    z = np.asarray(ho.Z_corr)
    return (z if z.shape[0] == pcs.shape[0] else z.T).astype(np.float32)


def _leiden_for_k(emb: np.ndarray, k: int, seed: int, n_neighbors: int) -> tuple:
    """Leiden on a ``n_neighbors``-NN graph of ``emb``; bisection on the resolution until it
    gives ``k`` clusters (else the closest count found). Returns labels and search info."""
    import anndata as ad
    import scanpy as sc

    g = ad.AnnData(np.zeros((emb.shape[0], 1), dtype=np.float32))
    g.obsm["X_emb"] = emb
    sc.pp.neighbors(g, use_rep="X_emb", n_neighbors=n_neighbors, random_state=seed)
    lo, hi, tried = 0.01, 3.0, []
    best = None
    for _ in range(30):
        res = (lo + hi) / 2
        sc.tl.leiden(
            g, resolution=res, random_state=seed, flavor="igraph", n_iterations=2, directed=False
        )
        n = g.obs["leiden"].nunique()
        tried.append((round(res, 4), int(n)))
        if best is None or abs(n - k) < abs(best[1] - k):
            best = (res, n, g.obs["leiden"].to_numpy().astype(str))
        if n == k:
            break
        lo, hi = (res, hi) if n < k else (lo, res)
    return best[2], {"resolution": round(best[0], 4), "n_clusters": int(best[1]), "tried": tried}


def banksy_worker(adata, k: int, seed: int, recipe: str) -> dict:
    """pybanksy's BANKSY matrix (multi-sample vignette recipe), PCA, Harmony, Leiden."""
    import scanpy as sc
    import scipy.sparse as sp
    from banksy.embed_banksy import generate_banksy_matrix
    from banksy.initialize_banksy import initialize_banksy
    from sklearn.decomposition import PCA

    lam = float(recipe.removeprefix("lambda"))
    samples = adata.obs["sample"].astype(str).to_numpy()
    hvgs: set = set()
    for sample in dict.fromkeys(samples):
        sub = adata[samples == sample].copy()
        sc.pp.filter_genes(sub, min_cells=1)
        n_top = min(2000, sub.n_vars)
        sc.pp.highly_variable_genes(sub, flavor="seurat_v3", n_top_genes=n_top)
        hvgs |= set(sub.var_names[sub.var["highly_variable"]])
    genes = [g for g in adata.var_names if g in hvgs]
    counts = sp.csr_matrix(adata.X, dtype=np.float64)
    total = np.asarray(counts.sum(axis=1)).ravel()
    scale = np.divide(5000.0, total, out=np.zeros_like(total), where=total > 0)
    rel = sp.diags(scale) @ counts  # relative counts x 5,000, no log (the vignette)
    cols = adata.var_names.get_indexer(genes)
    import anndata as ad

    data = ad.AnnData(
        X=np.asarray(rel[:, cols].todense()),
        obs=adata.obs[["sample"]].copy(),
        var=adata.var.iloc[cols].copy(),
    )
    data.obsm["coord_xy"] = _staggered(adata.obsm["spatial"], samples)
    data.obs["xcoord"] = data.obsm["coord_xy"][:, 0]
    data.obs["ycoord"] = data.obsm["coord_xy"][:, 1]
    coord_keys = ("xcoord", "ycoord", "coord_xy")
    banksy_dict = initialize_banksy(
        data,
        coord_keys,
        num_neighbours=18,
        nbr_weight_decay="scaled_gaussian",
        max_m=1,
        plt_edge_hist=False,
        plt_nbr_weights=False,
        plt_agf_angles=False,
        plt_theta=False,
    )
    banksy_dict, matrix = generate_banksy_matrix(data, banksy_dict, [lam], max_m=1, verbose=False)
    x = np.nan_to_num(np.asarray(matrix.X, dtype=np.float64))
    pcs = PCA(n_components=20, random_state=seed).fit_transform(x)
    emb = _harmony(pcs, adata.obs[["sample"]], seed)
    t0 = time.perf_counter()
    labels, info = _leiden_for_k(emb, k, seed, n_neighbors=50)
    return {
        "embedding": emb,
        "labels": labels,
        "cluster_seconds": time.perf_counter() - t0,
        "own": "Leiden (resolution search)",
        "params": {
            "lambda": lam,
            "n_hvgs_union": len(genes),
            "k_geom": 18,
            "max_m": 1,
            "decay": "scaled_gaussian",
            "normalisation": "relative counts x 5000, no log",
            "pca": 20,
            "harmony": "harmonypy theta 2 on sample",
            "leiden": {"n_neighbors": 50, **info},
        },
    }


def _lognorm_harmony(adata, seed: int, n_top: int = 3000, n_comps: int = 20) -> np.ndarray:
    """log-normalised counts, HVGs (seurat_v3 per sample), z-scores, PCA, Harmony on sample."""
    import scanpy as sc

    a = adata.copy()
    sc.pp.filter_genes(a, min_cells=10)
    sc.pp.highly_variable_genes(
        a, flavor="seurat_v3", n_top_genes=min(n_top, a.n_vars), batch_key="sample"
    )
    a = a[:, a.var["highly_variable"]].copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.scale(a)
    sc.pp.pca(a, n_comps=n_comps, random_state=seed)
    return _harmony(a.obsm["X_pca"], adata.obs[["sample"]], seed)


def _scvi_latent(adata, seed: int, n_top: int = 3000) -> tuple:
    """CellCharter's tutorial latent: scVI on the counts, batch = sample, early stopping."""
    import scanpy as sc
    import scvi

    scvi.settings.seed = seed
    scvi.settings.num_threads = 1
    a = adata.copy()
    sc.pp.filter_genes(a, min_cells=10)
    sc.pp.highly_variable_genes(
        a, flavor="seurat_v3", n_top_genes=min(n_top, a.n_vars), batch_key="sample"
    )
    a = a[:, a.var["highly_variable"]].copy()
    a.layers["counts"] = a.X.copy()
    scvi.model.SCVI.setup_anndata(a, layer="counts", batch_key="sample")
    model = scvi.model.SCVI(a)
    model.train(early_stopping=True, enable_progress_bar=False, accelerator="cpu")
    epochs = int(model.history["elbo_train"].shape[0])
    return np.asarray(model.get_latent_representation(), dtype=np.float32), epochs


def cellcharter_worker(adata, k: int, seed: int, recipe: str) -> dict:
    """Harmony PCs or scVI -> spatial graph (Delaunay, long links removed) -> 3-layer
    aggregation -> GMM."""
    import cellcharter as cc
    import squidpy as sq

    if recipe == "scvi":
        latent, epochs = _scvi_latent(adata, seed)
        described = f"scVI (3000 HVGs seurat_v3 by sample; defaults, early stopping: {epochs} ep)"
    else:
        latent = _lognorm_harmony(adata, seed)
        described = "Harmony PCs (log1p 1e4, 3000 HVGs seurat_v3 by sample, z, PCA 20)"
    adata.obsm["X_latent"] = latent
    adata.obs["sample"] = adata.obs["sample"].astype("category")
    sq.gr.spatial_neighbors(
        adata, library_key="sample", coord_type="generic", delaunay=True, spatial_key="spatial"
    )
    cc.gr.remove_long_links(adata)
    cc.gr.aggregate_neighbors(
        adata, n_layers=3, use_rep="X_latent", out_key="X_cellcharter", sample_key="sample"
    )
    emb = np.asarray(adata.obsm["X_cellcharter"], dtype=np.float32)
    t0 = time.perf_counter()
    model = cc.tl.Cluster(n_clusters=k, random_state=seed)
    model.fit(adata, use_rep="X_cellcharter")
    labels = np.asarray(model.predict(adata, use_rep="X_cellcharter")).astype(str)
    return {
        "embedding": emb,
        "labels": labels,
        "cluster_seconds": time.perf_counter() - t0,
        "own": "GMM (cc.tl.Cluster)",
        "params": {
            "latent": described,
            "graph": "squidpy generic Delaunay per sample + remove_long_links (99th pct)",
            "n_layers": 3,
            "cluster": "cc.tl.Cluster GMM full covariance",
        },
    }


def graphst_worker(adata, k: int, seed: int, recipe: str) -> dict:
    """GraphST (10X mode, its defaults) on the samples concatenated side by side in space."""
    import GraphST.utils as gu
    import torch
    from GraphST import GraphST

    samples = adata.obs["sample"].astype(str).to_numpy()
    adata.obsm["spatial"] = _staggered(adata.obsm["spatial"], samples)
    adata.var_names_make_unique()
    model = GraphST.GraphST(adata, device=torch.device("cpu"), random_seed=41 + seed)
    adata = model.train()
    t0 = time.perf_counter()
    notes = ""
    try:
        # its tutorials' non-R option: Leiden, resolution searched from 2.0 down by 0.01
        gu.clustering(adata, n_clusters=k, method="leiden", start=0.1, end=2.0, increment=0.01)
        labels = adata.obs["domain"].to_numpy().astype(str)
        own = "Leiden (its resolution search)"
    except AssertionError:
        labels, info = _leiden_for_k(adata.obsm["emb_pca"], k, seed, n_neighbors=50)
        own = "Leiden (bisection search; its own search found no K)"
        notes = f"its resolution search found no resolution for K: bisection {info}"
    return {
        "embedding": np.asarray(adata.obsm["emb_pca"], dtype=np.float32),
        "labels": labels,
        "cluster_seconds": time.perf_counter() - t0,
        "own": own,
        "notes": notes,
        "params": {
            "mode": "datatype 10X (dense spot graph, 3 spatial NN), 600 epochs, dim 64",
            "preprocess": "its own: 3000 HVGs seurat_v3, log1p 1e4, scale",
            "multi-sample": "samples concatenated, coordinates staggered (no cross-sample edges)",
            "random_seed": 41 + seed,
            "embedding for K-Means": "emb_pca (PCA 20 of emb, as its clustering)",
        },
    }


NOVAE_EPOCHS = 20  # its fit() default (early stopping: min_delta 0.05, patience 4)


def novae_worker(adata, k: int, seed: int, recipe: str) -> dict:
    """Novae trained from scratch (no pretrained weights can be downloaded here)."""
    import lightning
    import novae

    lightning.seed_everything(seed)
    adata.obs["sample"] = adata.obs["sample"].astype(str)
    novae.spatial_neighbors(
        adata, slide_key="sample", coord_type="generic", delaunay=True, percentile=99
    )
    model = novae.Novae(adata)
    model.fit(adata, max_epochs=NOVAE_EPOCHS, accelerator="cpu", num_workers=0)
    model.compute_representations(adata, accelerator="cpu", num_workers=0)
    emb = np.asarray(adata.obsm["novae_latent"], dtype=np.float32)
    t0 = time.perf_counter()
    key = model.assign_domains(adata, level=k)
    labels = adata.obs[key].astype(str).to_numpy()
    n = len(set(labels) - {"nan"})
    notes, own = "", "assign_domains(level=K)"
    if n != k:
        key = model.assign_domains(adata, n_domains=k)
        labels = adata.obs[key].astype(str).to_numpy()
        notes = f"assign_domains(level=K) gave {n} domains: used n_domains=K"
        own = "assign_domains(n_domains=K)"
    return {
        "embedding": emb,
        "labels": labels,
        "cluster_seconds": time.perf_counter() - t0,
        "own": own,
        "notes": notes,
        "params": {
            "init": "novae.Novae(adata): from scratch (gene embeddings PCA-initialised)",
            "graph": "novae.spatial_neighbors per sample, generic Delaunay, 99th pct links cut",
            "fit": f"max_epochs {NOVAE_EPOCHS} (its default), early stopping, CPU",
            "epochs_run": int(getattr(model.trainer, "current_epoch", -1))
            if getattr(model, "_trainer", None) is not None
            else None,
        },
    }


WORKERS = {
    "banksy": banksy_worker,
    "cellcharter": cellcharter_worker,
    "graphst": graphst_worker,
    "novae": novae_worker,
}


def spatlas_harmony_worker(adata, k: int, seed: int, recipe: str) -> dict:
    """(main venv) spatlas' paper preprocessing + Harmony: the baseline's embedding."""
    import spatlas

    spatlas.pp.preprocess_expression(adata, seed=seed)
    key = spatlas.pp.integrate(adata, method="harmony", seed=seed)
    return {
        "embedding": np.asarray(adata.obsm[key], dtype=np.float32),
        "params": {"preprocess": "spatlas defaults", "integrate": "harmony"},
    }


def worker_main(peer: str, recipe: str, h5ad: str, stem: str, k: int, seed: int) -> None:
    """Run one peer recipe on the cached cohort; writes ``stem.npz`` and ``stem.worker.json``."""
    import anndata as ad

    _one_torch_thread()
    adata = ad.read_h5ad(h5ad)
    fn = spatlas_harmony_worker if peer == "spatlas" else WORKERS[peer]
    t0 = time.perf_counter()
    out = fn(adata, k, seed, recipe)
    seconds = time.perf_counter() - t0
    arrays = {"embedding": np.asarray(out["embedding"], dtype=np.float32)}
    if out.get("labels") is not None:
        arrays["labels"] = np.asarray(out["labels"]).astype(str)
    np.savez_compressed(stem + ".npz", **arrays)
    record = {
        "inner_seconds": round(seconds, 2),
        "cluster_seconds": round(out.get("cluster_seconds", 0.0), 2),
        "own": out.get("own"),
        "params": out.get("params", {}),
        "notes": out.get("notes", ""),
        "versions": _versions(VERSION_OF.get(peer, ["spatlas"])),
    }
    Path(stem + ".worker.json").write_text(json.dumps(record, indent=1, default=str))


# ---------------------------------------------------------------------------------------------
# inputs, venvs, runs (main venv)
# ---------------------------------------------------------------------------------------------


def prepare(dataset: str) -> Path:
    """The cached cohort every tool reads (raw counts, obs, spatial coordinates)."""
    path = CACHE / f"peers_{dataset}.h5ad"
    if path.exists():
        return path
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from _common import load_dataset

    cohort = load_dataset(dataset)
    label = cohort.obs["label"].astype(object)
    label = label.where(label.notna() & (label.astype(str) != "nan"), None)
    obs = pd.DataFrame(
        {
            "sample": cohort.obs["sample"].astype(str).to_numpy(),
            "donor": cohort.obs["donor"].astype(str).to_numpy(),
            "label": pd.Categorical(label.to_numpy()),
        },
        index=cohort.obs_names.astype(str),
    )
    for key, legacy in (("array_row", "x"), ("array_col", "y")):  # her2st: x / y
        source = key if key in cohort.obs else legacy
        if source in cohort.obs:
            obs[key] = cohort.obs[source].to_numpy()
    out = ad.AnnData(
        X=sp.csr_matrix(cohort.X, dtype=np.float32),
        obs=obs,
        var=pd.DataFrame(index=cohort.var_names.astype(str)),
        obsm={"spatial": np.asarray(cohort.obsm["spatial"], dtype=np.float64)[:, :2]},
    )
    out.obs_names_make_unique()
    CACHE.mkdir(exist_ok=True)
    out.write_h5ad(path)
    return path


def prepare_spatlas(dataset: str) -> Path:
    """The same cohort with its images (uns['spatial']) for the spatlas CLI."""
    path = CACHE / f"peers_{dataset}_spatlas.h5ad"
    if path.exists():
        return path
    import spatlas

    from _common import load_dataset

    cohort = load_dataset(dataset)
    cached = _obs(dataset)
    cohort.obs_names = cached.index  # the ids domains.csv comes back with (as barcode)
    spatlas.io.write_h5ad(cohort, path)
    return path


_OBS: dict = {}


def _obs(dataset: str):
    if dataset not in _OBS:
        import anndata as ad

        _OBS[dataset] = ad.read_h5ad(prepare(dataset), backed="r").obs.copy()
    return _OBS[dataset]


def _digest(dataset: str) -> str:
    h = hashlib.sha256(prepare(dataset).read_bytes())
    return h.hexdigest()[:16]


def ensure_venv(peer: str) -> Path:
    """The peer's interpreter (venv created on first use); raises RuntimeError with the reason."""
    venv = VENVS / peer
    python = venv / "bin" / "python"
    ok = venv / ".peers-installed"
    if ok.exists():
        return python
    log = CACHE / f"peers_install_{peer}.log"
    CACHE.mkdir(exist_ok=True)
    print(f"  creating {venv} (log {log}) ...", flush=True)
    with open(log, "w") as fh:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=fh)
        for spec in VENV_SPECS[peer]:
            proc = subprocess.run(
                [str(python), "-m", "pip", "install", *spec], stdout=fh, stderr=subprocess.STDOUT
            )
            if proc.returncode != 0:
                raise RuntimeError(f"pip install {' '.join(spec)} failed: {_tail(log)}")
    ok.write_text(json.dumps(VENV_SPECS[peer]))
    return python


def _tail(log: Path, n: int = 6) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return " | ".join((errors[-2:] if errors else []) + lines[-n:])[-1500:]


def _run_process(cmd: list[str], log: Path, cwd: Path, timeout: float) -> dict:
    """Run ``cmd`` alone (one thread); wall, CPU (user + system) and peak RSS of it and its
    children (``os.wait4``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(THREAD_ENV)
    env.update({"MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"})
    env["CUDA_VISIBLE_DEVICES"] = ""
    cwd.mkdir(parents=True, exist_ok=True)
    load_before = round(os.getloadavg()[0], 2)
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                timed_out = True
                break
            time.sleep(0.5)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_mb": round(usage.ru_maxrss / 1024),
        "load_before": load_before,
        "load_after": round(os.getloadavg()[0], 2),
    }


def _git_commit() -> str:
    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=HERE.parent, capture_output=True, text=True
        ).stdout.strip()

    dirty = git("status", "--porcelain", "--", "src")
    return git("rev-parse", "--short", "HEAD") + (" (src modified)" if dirty else "")


def kmeans_refine(dataset: str, emb: np.ndarray, k: int, seed: int) -> tuple:
    """K-Means(K) on the embedding + spatlas' 10-NN refinement within each sample."""
    import anndata as ad
    from sklearn.cluster import KMeans

    from spatlas.tl._refine import refine_labels

    t0 = time.perf_counter()
    raw = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(emb)
    cached = ad.read_h5ad(prepare(dataset), backed="r")
    coords = np.asarray(cached.obsm["spatial"])
    labels = refine_labels(raw, coords, cached.obs["sample"].astype(str).to_numpy(), k=10)
    return labels.astype(str), time.perf_counter() - t0


def score(dataset: str, labels: np.ndarray) -> dict:
    """ARI per annotated sample, their mean, pooled ARI and NMI (mean per sample)."""
    import anndata as ad
    import pandas as pd

    import spatlas

    from _common import DATASETS

    info = DATASETS[dataset]
    cached = _obs(dataset)
    obs = pd.DataFrame(
        {
            "sample": pd.Categorical(cached["sample"].astype(str)),
            "donor": cached["donor"].astype(str).to_numpy(),
            "label": cached["label"].astype(object).where(cached["label"].notna(), None),
            "domain": pd.Categorical(np.asarray(labels).astype(str)),
        },
        index=cached.index,
    )
    table = spatlas.metrics.evaluate(
        ad.AnnData(obs=obs), cluster_key="domain", exclude_labels=tuple(info["exclude"])
    ).set_index("sample")
    row = {f"ARI {s}": float(table.loc[s, "ari"]) for s in info["annotated"]}
    row["ARI mean"] = float(table.loc["mean", "ari"])
    row["ARI pooled"] = float(table.loc["all", "ari"])
    row["NMI"] = float(table.loc["mean", "nmi"])
    return row


def _raw_path(peer: str, recipe: str, dataset: str, seed: int) -> Path:
    return RAW / f"{peer}_{recipe}_{dataset}_seed{seed}.json"


def run(peer: str, recipe: str, dataset: str, seed: int, *, recompute: bool) -> dict:
    """One run (reused from ``results/peers_raw`` unless ``recompute``); never raises for a
    peer's failure: the record says why."""
    from _common import DATASETS

    path = _raw_path(peer, recipe, dataset, seed)
    if path.exists() and not recompute:
        return json.loads(path.read_text())
    k = DATASETS[dataset]["k"]
    record = {
        "peer": peer,
        "recipe": recipe,
        "dataset": dataset,
        "seed": seed,
        "k": k,
        "inputs_digest": _digest(dataset),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"  {peer} {recipe} {dataset} seed {seed} ...", flush=True)
    n_spots = len(_obs(dataset))
    try:
        if n_spots > MAX_SPOTS.get(peer, np.inf):
            raise RuntimeError(
                f"not run: {n_spots} spots > {MAX_SPOTS[peer]}; " + SKIP_REASON[peer](n_spots)
            )
        if peer == "spatlas" and recipe == "default":
            record.update(_run_spatlas_default(dataset, seed, k))
        else:
            record.update(_run_worker(peer, recipe, dataset, seed, k))
        record["status"] = "ok"
    except RuntimeError as err:
        record["status"] = str(err) if str(err).startswith("not run") else f"failed: {err}"
        record.setdefault("rows", [])
    record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    RAW.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str))
    for row in record["rows"]:
        print(
            f"    {row['row']}: ARI mean {row['ARI mean']:.3f} pooled {row['ARI pooled']:.3f} "
            f"({row['seconds']} s, {record.get('peak_mb')} MB)",
            flush=True,
        )
    if record["status"] != "ok":
        print(f"    {record['status'][:400]}", flush=True)
    return record


def _run_worker(peer: str, recipe: str, dataset: str, seed: int, k: int) -> dict:
    python = Path(sys.executable) if peer == "spatlas" else ensure_venv(peer)
    h5ad = prepare(dataset)
    stem = CACHE / "peers_out" / f"{peer}_{recipe}_{dataset}_seed{seed}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".npz", ".worker.json"):
        Path(str(stem) + suffix).unlink(missing_ok=True)
    log = Path(str(stem) + ".log")
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", peer, recipe, str(h5ad)]
    cmd += [str(stem), str(k), str(seed)]
    limit = TIMEOUT_PEER.get((peer, recipe), TIMEOUT_PEER.get(peer, TIMEOUT_S))
    limit = min(limit, MAX_SECONDS)
    proc = _run_process(cmd, log, WORK / peer, limit)
    out = {k_: v for k_, v in proc.items() if k_ not in ("returncode", "timed_out")}
    if proc["timed_out"]:
        raise RuntimeError(
            f"stopped after {proc['seconds']} s (limit {limit:.0f} s; {proc['cpu_seconds']} CPU s, "
            f"{proc['peak_mb']} MB so far): {_tail(log, 2)}"
        )
    if proc["returncode"] != 0:
        raise RuntimeError(f"exit {proc['returncode']}: {_tail(log)}")
    info = json.loads(Path(str(stem) + ".worker.json").read_text())
    arrays = np.load(str(stem) + ".npz")
    rows = []
    own = info.get("own")
    base = proc["seconds"] - info.get("cluster_seconds", 0.0)
    if own and "labels" in arrays:
        rows.append(
            {
                "row": row_name(peer, recipe, own),
                "clustering": "own",
                "seconds": proc["seconds"],
                **score(dataset, arrays["labels"]),
            }
        )
    labels, km_seconds = kmeans_refine(dataset, arrays["embedding"], k, seed)
    rows.append(
        {
            "row": row_name(peer, recipe, "K-Means + refine"),
            "clustering": "kmeans+refine",
            "seconds": round(base + km_seconds, 1),
            **score(dataset, labels),
        }
    )
    return {
        **out,
        "versions": info["versions"],
        "params": info["params"],
        "notes": info.get("notes", ""),
        "embedding_dim": int(arrays["embedding"].shape[1]),
        "rows": rows,
    }


def _run_spatlas_default(dataset: str, seed: int, k: int) -> dict:
    """``python -m spatlas run`` on a config with only seed, data and clustering.n_clusters."""
    import pandas as pd
    import yaml

    import spatlas

    from _common import DATASETS

    h5ad = prepare_spatlas(dataset)
    work = CACHE / "peers_out" / f"spatlas_default_{dataset}_seed{seed}"
    cfg_path = Path(str(work) + ".yaml")
    config = {
        "seed": seed,
        "data": {
            "h5ad": str(h5ad),
            "sample_key": "sample",
            "donor_key": "donor",
            "exclude_labels": list(DATASETS[dataset]["exclude"]),
        },
        "clustering": {"n_clusters": k},
    }
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cli = Path(sys.executable).parent / "spatlas"  # the installed ``spatlas`` command
    cmd = [str(cli)] if cli.exists() else [sys.executable, "-c", CLI_MAIN]
    cmd += ["run", str(cfg_path), "--out", str(work)]
    cmd += ["--overwrite"]
    log = Path(str(work) + ".log")
    proc = _run_process(cmd, log, WORK / "spatlas", TIMEOUT_S)
    out = {k_: v for k_, v in proc.items() if k_ not in ("returncode", "timed_out")}
    if proc["timed_out"] or proc["returncode"] != 0:
        raise RuntimeError(f"spatlas run: exit {proc['returncode']}: {_tail(log)}")
    domains = pd.read_csv(work / "domains.csv")
    col = next(c for c in domains.columns if c.endswith("_domain"))
    by_id = pd.Series(domains[col].astype(str).to_numpy(), index=domains["barcode"].astype(str))
    labels = by_id.reindex(_obs(dataset).index).to_numpy()
    if pd.isna(labels).any():
        raise RuntimeError(f"domains.csv lacks {int(pd.isna(labels).sum())} spots")
    resolved = yaml.safe_load((work / "config.yaml").read_text())
    timings = pd.read_csv(work / "timings.csv")
    metrics = pd.read_csv(work / "metrics.csv") if (work / "metrics.csv").exists() else None
    own_mean = None
    if metrics is not None:
        own_mean = float(metrics.loc[metrics["sample"] == "mean", "ari"].iloc[0])
    return {
        **out,
        "versions": {"spatlas": spatlas.__version__, "commit": _git_commit()},
        "params": {
            "config": config,
            "resolved": {key: resolved.get(key) for key in ("integration", "model", "morphology")},
            "domain_column": col,
            "steps": timings.to_dict("records"),
            "cli_metrics_ari_mean": own_mean,
        },
        "rows": [
            {
                "row": row_name("spatlas", "default", f"{col} (CLI)"),
                "clustering": "own",
                "seconds": proc["seconds"],
                **score(dataset, labels),
            }
        ],
    }


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------


def collect() -> list[dict]:
    """Every raw record kept, in dataset / tool / recipe / seed order."""
    records = [json.loads(p.read_text()) for p in sorted(RAW.glob("*.json"))]
    order = {(p, r): i for i, (p, r) in enumerate((p, r) for p in PEERS for r in RECIPES[p])}
    records = [r for r in records if r["dataset"] in DATASET_ORDER]
    records.sort(
        key=lambda r: (
            DATASET_ORDER.index(r["dataset"]),
            order.get((r["peer"], r["recipe"]), 99),
            r["seed"],
        )
    )
    return records


def _version(rec: dict) -> str:
    v = rec.get("versions", {})
    main = {
        "spatlas": "spatlas",
        "banksy": "pybanksy",
        "cellcharter": "cellcharter",
        "graphst": "graphst-modern",
        "novae": "novae",
    }[rec["peer"]]
    text = f"{main} {v[main]}" if main in v else ""
    if rec["peer"] == "spatlas" and "commit" in v:
        text += f" @ {v['commit']}"
    return text


def _short(status: str) -> str:
    """A stopped run's status without its log tail (but with the epochs a progress bar shows)."""
    import re

    if "so far)" not in status:
        return status[:600]
    head = status[: status.index("so far)") + len("so far)")]
    bars = re.findall(r"(\d+)/(\d+) \[", status)
    return head + (f"; progress bar at {bars[-1][0]} of {bars[-1][1]}" if bars else "")


def tables(records: list[dict]) -> tuple:
    import pandas as pd

    from _common import DATASETS, markdown_table

    rows, failures = [], []
    for rec in records:
        if rec["status"] != "ok":
            failures.append(rec)
        for row in rec.get("rows", []):
            rows.append(
                {
                    "dataset": rec["dataset"],
                    "row": row["row"],
                    "peer": rec["peer"],
                    "recipe": rec["recipe"],
                    "seed": rec["seed"],
                    **{k: v for k, v in row.items() if k.startswith("ARI") or k == "NMI"},
                    "wall s": row["seconds"],
                    "CPU s": rec["cpu_seconds"],
                    "peak MB": rec["peak_mb"],
                    "load": f"{rec['load_before']}/{rec['load_after']}",
                    "version": _version(rec),
                }
            )
    table = pd.DataFrame(rows)
    parts = [
        "# Peers side by side with spatlas (issue 16)\n\n"
        "Same cached inputs for every tool, one thread, one run at a time; ARI per annotated "
        "sample, their mean (headline), pooled ARI, NMI (mean per sample). Wall / CPU s and "
        "peak MB: the run's own process (K-Means rows: the peer's run less its own clustering, "
        "plus K-Means + refinement). Several seeds: mean +- sd of the per-sample-mean ARI, "
        "other columns the mean. Commands and recipes: `benchmarks/peers.py`'s docstring.\n"
    ]
    for dataset in [d for d in DATASET_ORDER if not table.empty and d in set(table.dataset)]:
        sub = table[table["dataset"] == dataset]
        annotated = [f"ARI {s}" for s in DATASETS[dataset]["annotated"]]
        out = []
        for name, grp in sub.groupby("row", sort=False):
            n = len(grp)
            mean = grp["ARI mean"]
            line = {"tool / recipe: clustering": name, "seeds": n}
            line.update({c.removeprefix("ARI "): grp[c].mean() for c in annotated})
            line["ARI mean"] = (
                f"{mean.mean():.3f} +- {mean.std():.3f}" if n > 1 else f"{mean.iloc[0]:.3f}"
            )
            line["pooled"] = grp["ARI pooled"].mean()
            line["NMI"] = grp["NMI"].mean()
            line["wall s"] = f"{grp['wall s'].mean():.1f}"
            line["CPU s"] = f"{grp['CPU s'].mean():.1f}"
            line["peak MB"] = round(grp["peak MB"].mean())
            line["load"] = " ".join(grp["load"])
            line["version"] = grp["version"].iloc[0]
            out.append(line)
        info = DATASETS[dataset]
        head = f"## {dataset} (K = {info['k']}"
        head += f"; metrics without {', '.join(info['exclude'])})" if info["exclude"] else ")"
        parts.append(head + "\n\n" + markdown_table(pd.DataFrame(out)))
    if failures:
        lines = [
            f"- {r['peer']} {r['recipe']} on {r['dataset']} seed {r['seed']}: {_short(r['status'])}"
            for r in failures
        ]
        parts.append("## Runs that failed or could not run\n\n" + "\n".join(lines) + "\n")
    lines = [
        f"- {r['peer']} {r['recipe']} on {r['dataset']} seed {r['seed']}: {r['notes']}"
        for r in records
        if r.get("notes")
    ]
    if lines:
        parts.append("## Notes\n\n" + "\n".join(lines) + "\n")
    versions = {r["peer"]: r["versions"] for r in records if r.get("versions")}
    lines = [
        f"- {peer}: " + ", ".join(f"{k} {v}" for k, v in v_.items())
        for peer, v_ in versions.items()
    ]
    if lines:
        parts.append("## Versions (last run of each tool)\n\n" + "\n".join(lines) + "\n")
    return table, "\n".join(parts)


def write_tables() -> None:
    table, text = tables(collect())
    RESULTS.mkdir(exist_ok=True)
    table.to_csv(RESULTS / "peers.csv", index=False, float_format="%.4f")
    (RESULTS / "peers.md").write_text(text)
    print(text)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        if sys.path and Path(sys.path[0]).resolve() == HERE:
            sys.path.pop(0)  # benchmarks/ holds files named like packages (models.py, ...)
        peer, recipe, h5ad, stem, k, seed = sys.argv[2:8]
        worker_main(peer, recipe, h5ad, stem, int(k), int(seed))
        return
    sys.path.insert(0, str(HERE))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASET_ORDER))
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    parser.add_argument("--recipes", nargs="+", default=None, help="only these recipes")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--recompute", action="store_true", help="rerun the runs kept in raw/")
    parser.add_argument("--tables-only", action="store_true")
    parser.add_argument(
        "--max-seconds", type=float, default=np.inf, help="stop any run after S s (recorded)"
    )
    args = parser.parse_args()
    global MAX_SECONDS
    MAX_SECONDS = args.max_seconds
    if not args.tables_only:
        for dataset in args.datasets:
            prepare(dataset)
            for peer in args.peers:
                for recipe in RECIPES[peer]:
                    if args.recipes and recipe not in args.recipes:
                        continue
                    for seed in args.seeds:
                        run(peer, recipe, dataset, seed, recompute=args.recompute)
    write_tables()


if __name__ == "__main__":
    main()
