"""spatlas ``grid_ae`` against AESTETIK 0.3.1 on the same inputs (GitHub issue 5).

Both tools get the very same arrays: Harmony-corrected expression PCs (paper preprocessing,
``spatlas.pp.integrate`` harmony, theta 2, seed 0) and a morphology embedding, the same K,
K-Means clustering and spatial refinement, per-sample windows. Each run is its own process;
its wall seconds, CPU seconds and peak RSS are its own.

- DLPFC donor Br8100 (151673-76 jointly, K = 7). Morphology (until the morphology features
  land): per-spot colour statistics of the bundled lowres H&E image in a 9 x 9 px box around the
  spot (mean / sd of R, G, B; mean optical density of haematoxylin and eosin, sd of
  haematoxylin) plus log1p(nuclei_count): 10 features, z-scored, PCA (all 10 components),
  Harmony on sample. Morphology weight 1.5 (AESTETIK's default) for both tools.
- her2st patients A-E (27 sections jointly, K = 6, metrics on A1-E1 without 'undetermined'):
  most sections have no image, so transcriptomics only: morphology weight 0 for both tools
  (AESTETIK needs a morphology input: it gets one constant column, which it ignores at weight 0).

AESTETIK runs in its own virtual environment (``benchmarks/.venvs/aestetik``, created on first
use with ``pip install aestetik==0.3.1``), called as ``AESTETIK(morphology_weight=...,
n_cluster=K, clustering_method='kmeans', refine_cluster=True, used_obs_batch='sample',
random_state=seed)`` on ``obsm['X_pca_transcriptomics']`` / ``obsm['X_pca_morphology']`` and
``obs['x_array'/'y_array']`` (Visium array row / column; her2st x / y): at its defaults
(window 7, 100 epochs, 1,000 prediction repeats; raw results kept under
``benchmarks/results/aestetik_raw/`` and reused unless ``--recompute-aestetik``) and reduced
(10 epochs, 100 repeats) over three seeds. spatlas runs ``grid_ae`` at its defaults (window 5,
1,000 steps of 512 spots) except window 3 on her2st (see ``GRID_AE``), then K-Means + the same
10-NN refinement; "Harmony alone" is K-Means + refinement on the Harmony PCs.

    python benchmarks/vs_aestetik.py                         # everything; reuses raw AESTETIK runs
    python benchmarks/vs_aestetik.py --reuse-only            # tables from the AESTETIK runs done
    python benchmarks/vs_aestetik.py --only aestetik         # fill the raw AESTETIK results only
    python benchmarks/vs_aestetik.py --only aestetik --datasets dlpfc --settings default
        --recompute-aestetik --stop-after 1500   # (one line) a run too long to finish here:
                                                 # record its cost so far, as bounds
    python benchmarks/vs_aestetik.py --datasets dlpfc --recompute-aestetik
    python benchmarks/vs_aestetik.py --window-ablation       # grid_ae window 1 / 3 / 5 / 7 on DLPFC
    python benchmarks/vs_aestetik.py --window-ablation her2st          # 1 / 3 / 5 on her2st

Writes benchmarks/results/vs_aestetik.csv and vs_aestetik.md (and vs_aestetik_windows.* /
vs_aestetik_windows_her2st.* for the ablations).
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
RAW = HERE / "results" / "aestetik_raw"
CACHE = HERE / ".cache"
VENV = HERE / ".venvs" / "aestetik"
AESTETIK_VERSION = "0.3.1"

# AESTETIK settings: its defaults, and the cheaper setting used for the seed spread
AESTETIK_SETTINGS = {
    "default": {"max_epochs": 100, "num_repeats_predict": 1000},
    "reduced": {"max_epochs": 10, "num_repeats_predict": 100},
    "smoke": {"max_epochs": 1, "num_repeats_predict": 2},  # checks the set-up only
}
MORPHOLOGY_WEIGHT = {"dlpfc": 1.5, "her2st": 0.0}
SEEDS = (0, 1, 2)


def _proc_status(field: str, pid: int | str = "self") -> float:
    """A ``VmHWM``-style field of /proc/<pid>/status in MB (e.g. the peak RSS of that process
    alone; the AESTETIK worker cannot import spatlas' ``peak_rss_mb``)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _load_average() -> float:
    return round(os.getloadavg()[0], 2)


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# inputs (main venv)
# ---------------------------------------------------------------------------------------------


def _lowres_colour_features(adata) -> np.ndarray:
    """Colour statistics of the lowres H&E around every spot (box of 9 x 9 lowres px)."""
    from scipy import ndimage

    from spatlas import _keys as K

    h_od = np.array([0.650, 0.704, 0.286])
    e_od = np.array([0.072, 0.990, 0.105])
    feats = np.zeros((adata.n_obs, 9), dtype=np.float64)
    samples = adata.obs[K.SAMPLE].astype(str).to_numpy()
    for sample in np.unique(samples):
        rows = np.flatnonzero(samples == sample)
        info = adata.uns[K.SPATIAL][sample]
        image = np.asarray(info[K.IMAGES]["lowres"], dtype=np.float64)
        image = image / 255.0 if image.max() > 1.5 else image
        scale = info[K.SCALEFACTORS][K.LOWRES_SCALEF]
        xy = np.asarray(adata.obsm[K.SPATIAL])[rows] * scale
        col = np.clip(np.rint(xy[:, 0]).astype(int), 0, image.shape[1] - 1)
        row = np.clip(np.rint(xy[:, 1]).astype(int), 0, image.shape[0] - 1)
        od = -np.log(np.clip(image, 1 / 255, 1))
        # unmixing of optical density into haematoxylin / eosin (least squares on 2 stains)
        stains = np.linalg.lstsq(np.stack([h_od, e_od], 1), od.reshape(-1, 3).T, rcond=None)[0]
        haem, eos = (s.reshape(image.shape[:2]) for s in stains)
        channels = [image[..., c] for c in range(3)] + [haem, eos]
        means = [ndimage.uniform_filter(c, size=9, mode="nearest") for c in channels]
        sq = [ndimage.uniform_filter(c**2, size=9, mode="nearest") for c in (*channels[:3], haem)]
        sds = [np.sqrt(np.clip(s - m**2, 0, None)) for s, m in zip(sq, means[:4], strict=True)]
        stack = np.stack([*means, *sds], axis=-1)  # 5 means + 4 sds
        feats[rows] = stack[row, col]
    return feats


def dlpfc_morphology(adata, seed: int) -> np.ndarray:
    """DLPFC morphology embedding: lowres colour statistics + log nuclei count, z-scored, PCA
    (-> ``obsm['X_morph_pca']``), Harmony on sample (-> ``obsm['X_morph_harmony']``, returned)."""
    from sklearn.decomposition import PCA

    import spatlas

    colour = _lowres_colour_features(adata)
    nuclei = np.log1p(adata.obs["nuclei_count"].fillna(0).to_numpy(dtype=np.float64))
    raw = np.column_stack([colour, nuclei])
    z = (raw - raw.mean(0)) / raw.std(0)
    adata.obsm["X_morph_pca"] = PCA(n_components=raw.shape[1], random_state=seed).fit_transform(z)
    key = spatlas.pp.integrate(
        adata, basis="X_morph_pca", method="harmony", seed=seed, key_added="X_morph_harmony"
    )
    return np.asarray(adata.obsm[key], dtype=np.float32)


def prepare_inputs(dataset: str, seed: int = 0) -> Path:
    """The arrays both tools read (cached): expression / morphology embeddings, coordinates."""
    path = CACHE / f"vs_aestetik_{dataset}_inputs.npz"
    if path.exists():
        return path
    import anndata as ad

    import spatlas
    from spatlas import _keys as K

    sys.path.insert(0, str(HERE))
    from baselines import preprocess

    pp_path, _ = preprocess(dataset, seed)
    adata = ad.read_h5ad(pp_path)
    expr_key = spatlas.pp.integrate(adata, basis=K.PCA, method="harmony", seed=seed)
    expr = np.asarray(adata.obsm[expr_key], dtype=np.float32)
    if dataset == "dlpfc":
        morph = dlpfc_morphology(adata, seed)
        lattice = adata.obs[[K.ARRAY_ROW, K.ARRAY_COL]].to_numpy(dtype=np.int64)
    else:
        morph = np.zeros((adata.n_obs, 1), dtype=np.float32)
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
        expr=expr,
        morph=morph,
    )
    return path


# ---------------------------------------------------------------------------------------------
# AESTETIK worker (runs in the AESTETIK venv: numpy, pandas, anndata, aestetik only)
# ---------------------------------------------------------------------------------------------


def aestetik_worker(inputs: str, stem: str, *, setting: str, seed: int, k: int, mw: float) -> None:
    """Fit AESTETIK on the inputs; writes ``stem.npz`` (labels, embedding) and ``stem.json``."""
    import logging

    import aestetik
    import anndata as ad
    import pandas as pd
    import torch
    from aestetik import AESTETIK

    logging.getLogger("lightning").setLevel(logging.WARNING)
    data = np.load(inputs)
    obs = pd.DataFrame(
        {
            "x_array": data["lattice"][:, 0],
            "y_array": data["lattice"][:, 1],
            "sample": pd.Categorical(data["sample"]),
        },
        index=data["obs_names"],
    )
    adata = ad.AnnData(
        obs=obs,
        obsm={"X_pca_transcriptomics": data["expr"], "X_pca_morphology": data["morph"]},
    )
    params = {
        "morphology_weight": mw,
        "n_cluster": k,
        "clustering_method": "kmeans",
        "refine_cluster": True,
        "used_obs_batch": "sample",
        "random_state": seed,
        **AESTETIK_SETTINGS[setting],
    }
    model = AESTETIK(**params)
    load_before = _load_average()
    cpu0, wall0 = os.times(), time.perf_counter()
    model.fit(adata)
    wall = time.perf_counter() - wall0
    cpu1 = os.times()
    np.savez_compressed(
        stem + ".npz",
        labels=np.asarray(model.labels_).astype(str),
        embedding=np.asarray(model.embedding_, dtype=np.float32),
    )
    record = {
        "tool": "aestetik",
        "version": aestetik.__version__,
        "setting": setting,
        "seed": seed,
        "params": {**params, "window_size": model.window_size},
        "seconds": round(wall, 1),
        "cpu_seconds": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 1),
        "peak_mb": round(_proc_status("VmHWM")),
        "torch_threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": _load_average(),
        "inputs_digest": _digest(data["expr"], data["morph"]),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(stem + ".json").write_text(json.dumps(record, indent=1))
    print("RESULT " + json.dumps(record), flush=True)


def ensure_aestetik_venv() -> Path:
    """The AESTETIK interpreter (virtual environment created on first use)."""
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable.replace("python", "python3"), "-m", "venv", str(VENV)])
        if not python.exists():
            subprocess.run(["python3", "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", f"aestetik=={AESTETIK_VERSION}"], check=True
        )
    return python


def _proc_stats(pid: int) -> dict:
    """Peak RSS (MB) and CPU seconds of a running process (``/proc``; empty once it is gone)."""
    try:
        peak = _proc_status("VmHWM", pid)
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return {}
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return {"peak_mb": round(peak), "cpu_seconds": cpu}


def _epochs_done(logs: Path, since: float) -> int:
    """Epochs AESTETIK (Lightning) has checkpointed in a ``lightning_logs`` version made since."""
    done = 0
    for ckpt in logs.glob("version_*/checkpoints/epoch=*.ckpt"):
        if ckpt.stat().st_mtime >= since:
            done = max(done, int(ckpt.name.split("=")[1].split("-")[0]) + 1)
    return done


def run_aestetik(
    dataset: str, setting: str, seed: int, *, recompute: bool, stop_after: float | None = None
) -> dict | None:
    """One AESTETIK run (reused from ``results/aestetik_raw`` unless ``recompute``).

    ``stop_after``: stop the run after that many wall seconds and write what it reached
    (``<stem>.incomplete.json``: seconds, CPU seconds, peak RSS, epochs) instead; returns
    ``None`` then. Those are lower bounds of a full run's cost.
    """
    from _common import DATASETS

    stem = RAW / f"{dataset}_{setting}_seed{seed}"
    if not recompute and Path(str(stem) + ".json").exists():
        return json.loads(Path(str(stem) + ".json").read_text())
    inputs = prepare_inputs(dataset)
    python = ensure_aestetik_venv()
    RAW.mkdir(parents=True, exist_ok=True)
    workdir = CACHE / "aestetik_work"  # Lightning writes lightning_logs/ into the cwd
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [str(python), str(Path(__file__).resolve()), "--aestetik-worker", str(inputs)]
    cmd += [str(stem), setting, str(seed), str(DATASETS[dataset]["k"])]
    cmd += [str(MORPHOLOGY_WEIGHT[dataset])]
    log = CACHE / f"aestetik_{dataset}_{setting}_seed{seed}.log"
    print(f"  AESTETIK {dataset} {setting} seed {seed} ... (log {log})", flush=True)
    start, started = time.perf_counter(), time.time()
    load_before, stats = _load_average(), {}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=workdir)
        while proc.poll() is None:
            stats = _proc_stats(proc.pid) or stats
            if stop_after is not None and time.perf_counter() - start > stop_after:
                proc.kill()
                proc.wait()
                _write_incomplete(
                    stem,
                    setting=setting,
                    seed=seed,
                    seconds=time.perf_counter() - start,
                    stats=stats,
                    epochs=_epochs_done(workdir / "lightning_logs", started),
                    load=(load_before, _load_average()),
                    digest=_digest(*(np.load(inputs)[k] for k in ("expr", "morph"))),
                    started=started,
                )
                return None
            time.sleep(2)
    if proc.returncode != 0:
        raise SystemExit(f"AESTETIK {dataset} {setting} seed {seed} failed: see {log}")
    record = json.loads(Path(str(stem) + ".json").read_text())
    record["process_seconds"] = round(time.perf_counter() - start, 1)
    Path(str(stem) + ".json").write_text(json.dumps(record, indent=1))
    Path(str(stem) + ".incomplete.json").unlink(missing_ok=True)  # superseded
    return record


def _write_incomplete(stem: Path, *, setting, seed, seconds, stats, epochs, load, digest, started):
    total = AESTETIK_SETTINGS[setting]["max_epochs"]
    record = {
        "tool": "aestetik",
        "version": AESTETIK_VERSION,
        "setting": setting,
        "seed": seed,
        "status": f"stopped by --stop-after after {seconds:.0f} s, {epochs} of {total} epochs "
        "trained, no prediction yet",
        "seconds_at_least": round(seconds, 1),
        "cpu_seconds_at_least": round(stats.get("cpu_seconds", float("nan")), 1),
        "peak_mb_at_least": stats.get("peak_mb"),
        "epochs_done": epochs,
        "max_epochs": total,
        "num_repeats_predict": AESTETIK_SETTINGS[setting]["num_repeats_predict"],
        "load_before": load[0],
        "load_after": load[1],
        "inputs_digest": digest,
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
    }
    if epochs:
        # at the average pace so far (set-up included), before the prediction repeats
        record["training_hours_projected"] = round(seconds / epochs * total / 3600, 1)
    path = Path(str(stem) + ".incomplete.json")
    path.write_text(json.dumps(record, indent=1))
    print(f"  AESTETIK {stem.name}: stopped, see {path}", flush=True)


# ---------------------------------------------------------------------------------------------
# spatlas worker (main venv)
# ---------------------------------------------------------------------------------------------


def spatlas_worker(
    inputs: str, stem: str, *, method: str, seed: int, k: int, mw: float, params: dict
) -> None:
    """Harmony alone or Harmony + grid_ae on the inputs, K-Means + refinement; like the above."""
    import anndata as ad
    import pandas as pd

    import spatlas

    data = np.load(inputs)
    obs = pd.DataFrame(
        {
            "sample": pd.Categorical(data["sample"]),
            "array_row": data["lattice"][:, 0],
            "array_col": data["lattice"][:, 1],
        },
        index=data["obs_names"],
    )
    obsm = {"X_pca_harmony": data["expr"], "spatial": data["spatial"]}
    if mw > 0:
        obsm["X_morph_harmony"] = data["morph"]
    adata = ad.AnnData(obs=obs, obsm=obsm)
    load_before = _load_average()
    cpu0, wall0 = os.times(), time.perf_counter()
    basis = "X_pca_harmony"
    if method == "grid_ae":
        model = spatlas.models.fit_model(
            adata,
            "grid_ae",
            expression_key=basis,
            morphology_key="X_morph_harmony" if mw > 0 else None,
            seed=seed,
            morphology_weight=mw,
            n_pseudo_labels=k,
            progress=False,
            **params,
        )
        basis = "X_grid_ae"
    spatlas.tl.cluster(adata, basis=basis, n_clusters=k, seed=seed, key_added="domain_raw")
    spatlas.tl.refine(adata, key="domain_raw", key_added="domain")
    wall = time.perf_counter() - wall0
    cpu1 = os.times()
    np.savez_compressed(
        stem + ".npz",
        labels=adata.obs["domain"].to_numpy().astype(str),
        embedding=np.asarray(adata.obsm[basis], dtype=np.float32),
    )
    record = {
        "tool": "spatlas",
        "method": method,
        "seed": seed,
        "params": {
            "morphology_weight": mw,
            **params,
            **(model.train_params | model.init_params if method == "grid_ae" else {}),
        },
        "seconds": round(wall, 1),
        "cpu_seconds": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 1),
        "peak_mb": round(_proc_status("VmHWM")),
        "load_before": load_before,
        "load_after": _load_average(),
        "inputs_digest": _digest(data["expr"], data["morph"]),
    }
    Path(stem + ".json").write_text(json.dumps(record, indent=1, default=str))


REUSE_SPATLAS = False  # --reuse-spatlas: tables from the cached spatlas runs


def run_spatlas(dataset: str, method: str, seed: int, params: dict, tag: str) -> dict:
    """One spatlas run in its own process (raw files under .cache: cheap to recompute)."""
    from _common import DATASETS

    inputs = prepare_inputs(dataset)
    out = CACHE / "spatlas_raw"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{dataset}_{tag}_seed{seed}"
    if REUSE_SPATLAS and Path(str(stem) + ".json").exists():
        record = json.loads(Path(str(stem) + ".json").read_text())
        return {**record, "stem": str(stem)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--spatlas-worker", str(inputs)]
    cmd += [str(stem), method, str(seed), str(DATASETS[dataset]["k"])]
    cmd += [str(MORPHOLOGY_WEIGHT[dataset]), json.dumps(params)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"spatlas {dataset} {tag} seed {seed} failed")
    record = json.loads(Path(str(stem) + ".json").read_text())
    record["process_seconds"] = round(time.perf_counter() - start, 1)
    record["stem"] = str(stem)
    return record


# ---------------------------------------------------------------------------------------------
# scoring and tables (main venv)
# ---------------------------------------------------------------------------------------------


def score(dataset: str, labels: np.ndarray) -> dict:
    """ARI per annotated sample, their mean (headline), pooled ARI and NMI (mean per sample)."""
    import anndata as ad
    import pandas as pd

    import spatlas

    from _common import DATASETS

    data = np.load(prepare_inputs(dataset))
    info = DATASETS[dataset]
    label = np.where(data["label"] == "", None, data["label"]).astype(object)
    obs = pd.DataFrame(
        {
            "sample": pd.Categorical(data["sample"]),
            "donor": data["donor"],
            "label": label,
            "domain": pd.Categorical(labels.astype(str)),
        },
        index=data["obs_names"],
    )
    table = spatlas.metrics.evaluate(
        ad.AnnData(obs=obs), cluster_key="domain", exclude_labels=tuple(info["exclude"])
    ).set_index("sample")
    row = {f"ARI {s}": table.loc[s, "ari"] for s in info["annotated"]}
    row["ARI mean"] = table.loc["mean", "ari"]
    row["ARI pooled"] = table.loc["all", "ari"]
    row["NMI"] = table.loc["mean", "nmi"]
    return row


def _labels(record: dict, dataset: str) -> np.ndarray:
    stem = record.get("stem") or str(RAW / f"{dataset}_{record['setting']}_seed{record['seed']}")
    return np.load(stem + ".npz")["labels"]


# spatlas' grid_ae settings: its defaults (window 5, 1,000 steps, ...) except the window on
# her2st's legacy ST lattice, whose spots sit 200 um apart instead of Visium's 100 um: a 3 x 3
# window there covers the tissue a 5 x 5 window covers on Visium (window 5: see the sweep).
GRID_AE: dict = {"dlpfc": {}, "her2st": {"window": 3}}


def _aestetik_if_available(dataset, setting, seed, *, recompute, reuse_only):
    stem = RAW / f"{dataset}_{setting}_seed{seed}"
    if reuse_only and not Path(str(stem) + ".json").exists():
        print(f"  AESTETIK {dataset} {setting} seed {seed}: no raw result yet (skipped)")
        return None
    return run_aestetik(dataset, setting, seed, recompute=recompute)


def compare(datasets: list[str], *, recompute: bool, reuse_only: bool, seeds=SEEDS) -> None:
    import pandas as pd

    from _common import RESULTS

    rows = []
    for dataset in datasets:
        runs: list = []
        params = GRID_AE[dataset]
        for seed in seeds:
            harmony = run_spatlas(dataset, "harmony", seed, {}, "harmony")
            runs.append(("Harmony alone + refine", seed, harmony))
            ours = run_spatlas(dataset, "grid_ae", seed, params, "grid_ae")
            runs.append(("spatlas Harmony + grid_ae", seed, ours))
        opts = {"recompute": recompute, "reuse_only": reuse_only}
        ref = _aestetik_if_available(dataset, "default", 0, **opts)
        runs.append(("AESTETIK default (100 ep, 1000 rep)", 0, ref))
        for seed in seeds:
            red = _aestetik_if_available(dataset, "reduced", seed, **opts)
            runs.append(("AESTETIK reduced (10 ep, 100 rep)", seed, red))
        for name, seed, rec in runs:
            if rec is None:
                continue
            row = {"dataset": dataset, "run": name, "seed": seed}
            row.update(score(dataset, _labels(rec, dataset)))
            row.update(
                {
                    "seconds": rec["seconds"],
                    "cpu s": rec["cpu_seconds"],
                    "peak MB": rec["peak_mb"],
                    "load": f"{rec['load_before']}/{rec['load_after']}",
                    "inputs": rec["inputs_digest"],
                }
            )
            rows.append(row)
            print(
                f"  {dataset} {name} seed {seed}: ARI mean {row['ARI mean']:.3f} "
                f"{row['seconds']} s {row['peak MB']} MB",
                flush=True,
            )
    table = pd.DataFrame(rows)
    RESULTS.mkdir(exist_ok=True)
    table.to_csv(RESULTS / "vs_aestetik.csv", index=False, float_format="%.4f")
    (RESULTS / "vs_aestetik.md").write_text(report(table))
    print(report(table))


RUNS = [
    "Harmony alone + refine",
    "spatlas Harmony + grid_ae",
    "AESTETIK default (100 ep, 1000 rep)",
    "AESTETIK reduced (10 ep, 100 rep)",
]


def _incomplete(dataset: str, setting: str, seed: int) -> dict | None:
    path = RAW / f"{dataset}_{setting}_seed{seed}.incomplete.json"
    return json.loads(path.read_text()) if path.exists() else None


def _ratio(ours: float, ref: float, bound: dict | None, key: str):
    """``ours / ref``; without a finished reference, ``< ours / lower bound`` of an incomplete
    run (its cost so far), marked as a bound; else NaN."""
    if np.isfinite(ref):
        return ours / ref
    if bound is not None and bound.get(key):
        return f"< {ours / bound[key]:.3f} (AESTETIK stopped unfinished: bound)"
    return float("nan")


def report(table) -> str:
    """Markdown: per-run tables, seed summaries and the ratios against the issue's targets."""
    import pandas as pd

    from _common import DATASETS, markdown_table

    parts = []
    for dataset, sub in table.groupby("dataset", sort=False):
        sub = sub.dropna(axis=1, how="all").drop(columns=["dataset"])
        first = ["run", "seed", *(f"ARI {s}" for s in DATASETS[dataset]["annotated"])]
        sub = sub[first + [c for c in sub.columns if c not in first]]
        parts.append(f"### {dataset}: every run\n\n" + markdown_table(sub))
        summary = (
            sub.groupby("run", sort=False)
            .agg(
                seeds=("seed", "count"),
                ari_mean=("ARI mean", "mean"),
                ari_sd=("ARI mean", "std"),
                pooled=("ARI pooled", "mean"),
                nmi=("NMI", "mean"),
                seconds=("seconds", "mean"),
                cpu_s=("cpu s", "mean"),
                peak_mb=("peak MB", "mean"),
            )
            .reset_index()
        )
        parts.append(
            f"### {dataset}: mean over seeds (sd of the per-sample-mean ARI)\n\n"
            + markdown_table(summary)
        )
        s = summary.set_index("run").reindex(RUNS)  # runs not done yet: NaN ratios
        ours = s.loc["spatlas Harmony + grid_ae"]
        ref = s.loc["AESTETIK default (100 ep, 1000 rep)"]
        red = s.loc["AESTETIK reduced (10 ep, 100 rep)"]
        harmony = s.loc["Harmony alone + refine"]
        bound = _incomplete(dataset, "default", 0)
        ratios = pd.DataFrame(
            [
                {
                    "ratio": "ARI mean: spatlas / AESTETIK default",
                    "value": ours.ari_mean / ref.ari_mean,
                    "target": ">= 1.10",
                },
                {
                    "ratio": "ARI mean: spatlas / AESTETIK reduced",
                    "value": ours.ari_mean / red.ari_mean,
                    "target": "",
                },
                {
                    "ratio": "wall s / CPU s / peak MB: spatlas / AESTETIK reduced",
                    "value": f"{ours.seconds / red.seconds:.3f} / {ours.cpu_s / red.cpu_s:.3f}"
                    f" / {ours.peak_mb / red.peak_mb:.3f}",
                    "target": "",
                },
                {
                    "ratio": "wall s: spatlas / AESTETIK default",
                    "value": _ratio(ours.seconds, ref.seconds, bound, "seconds_at_least"),
                    "target": "<= 0.05",
                },
                {
                    "ratio": "CPU s: spatlas / AESTETIK default",
                    "value": _ratio(ours.cpu_s, ref.cpu_s, bound, "cpu_seconds_at_least"),
                    "target": "",
                },
                {
                    "ratio": "peak MB: spatlas / AESTETIK default",
                    "value": _ratio(ours.peak_mb, ref.peak_mb, bound, "peak_mb_at_least"),
                    "target": "<= 0.25",
                },
                {
                    "ratio": "ARI mean: Harmony + grid_ae / Harmony alone",
                    "value": ours.ari_mean / harmony.ari_mean,
                    "target": "> 1",
                },
            ]
        )
        parts.append(
            f"### {dataset}: ratios (K = {DATASETS[dataset]['k']})\n\n" + markdown_table(ratios)
        )
        for note in sorted(RAW.glob(f"{dataset}_*.incomplete.json")):
            info = json.loads(note.read_text())
            lines = "\n".join(f"- {k}: {v}" for k, v in info.items())
            parts.append(f"### {dataset}: incomplete run ({note.name})\n\n{lines}\n")
    return "\n".join(parts)


def window_ablation(dataset: str = "dlpfc", seeds=SEEDS) -> None:
    """grid_ae with window 1 / 3 / 5 / 7 on DLPFC (the paper's Figure 5), 3 seeds each; her2st:
    window 1 / 3 / 5 (its legacy ST spots are twice as far apart)."""
    windows = (1, 3, 5, 7) if dataset == "dlpfc" else (1, 3, 5)
    name = "vs_aestetik_windows" if dataset == "dlpfc" else f"vs_aestetik_windows_{dataset}"
    title = {"dlpfc": "DLPFC Br8100", "her2st": "her2st A-E"}[dataset]
    import pandas as pd

    from _common import RESULTS, markdown_table

    rows = []
    for window in windows:
        for seed in seeds:
            params = {**GRID_AE[dataset], "window": window}
            rec = run_spatlas(dataset, "grid_ae", seed, params, f"w{window}")
            row = {"window": window, "seed": seed, **score(dataset, _labels(rec, dataset))}
            row.update({"seconds": rec["seconds"], "peak MB": rec["peak_mb"]})
            rows.append(row)
            print(f"  window {window} seed {seed}: ARI mean {row['ARI mean']:.3f}", flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(RESULTS / f"{name}.csv", index=False, float_format="%.4f")
    summary = (
        table.groupby("window")
        .agg(
            ari_mean=("ARI mean", "mean"),
            ari_sd=("ARI mean", "std"),
            nmi=("NMI", "mean"),
            seconds=("seconds", "mean"),
        )
        .reset_index()
    )
    text = f"### {title}: grid_ae window size (3 seeds)\n\n" + markdown_table(summary)
    text += "\n### every run\n\n" + markdown_table(table)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aestetik-worker", nargs=6, metavar="ARG")
    parser.add_argument("--spatlas-worker", nargs=7, metavar="ARG")
    args, _ = parser.parse_known_args()
    if args.aestetik_worker:
        inputs, stem, setting, seed, k, mw = args.aestetik_worker
        aestetik_worker(inputs, stem, setting=setting, seed=int(seed), k=int(k), mw=float(mw))
        return
    if args.spatlas_worker:
        inputs, stem, method, seed, k, mw, params = args.spatlas_worker
        spatlas_worker(
            inputs,
            stem,
            method=method,
            seed=int(seed),
            k=int(k),
            mw=float(mw),
            params=json.loads(params),
        )
        return
    _main_venv()


def _main_venv() -> None:
    sys.path.insert(0, str(HERE))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["dlpfc", "her2st"])
    parser.add_argument(
        "--only",
        choices=["aestetik"],
        default=None,
        help="only fill the raw AESTETIK results (for a background job)",
    )
    parser.add_argument("--recompute-aestetik", action="store_true")
    parser.add_argument(
        "--stop-after",
        type=float,
        default=None,
        metavar="S",
        help="with --only aestetik: stop each AESTETIK run after S wall seconds and record "
        "how far it got (<stem>.incomplete.json: lower bounds of its cost)",
    )
    parser.add_argument("--settings", nargs="+", default=["default", "reduced"])
    parser.add_argument(
        "--window-ablation",
        nargs="?",
        const="dlpfc",
        default=None,
        choices=["dlpfc", "her2st"],
        help="grid_ae window sweep on DLPFC (default) or her2st",
    )
    parser.add_argument(
        "--reuse-only",
        action="store_true",
        help="use the AESTETIK raw results that exist; run none (missing rows are left out)",
    )
    parser.add_argument(
        "--reuse-spatlas", action="store_true", help="reuse the cached spatlas runs (.cache)"
    )
    args = parser.parse_args()
    global REUSE_SPATLAS
    REUSE_SPATLAS = args.reuse_spatlas
    if args.window_ablation:
        window_ablation(args.window_ablation)
        return
    if args.only == "aestetik":
        for dataset in args.datasets:
            for setting in args.settings:
                for seed in SEEDS if setting == "reduced" else (0,):
                    rec = run_aestetik(
                        dataset,
                        setting,
                        seed,
                        recompute=args.recompute_aestetik,
                        stop_after=args.stop_after,
                    )
                    if rec is None:
                        continue
                    print(
                        f"  AESTETIK {dataset} {setting} seed {seed}: {rec['seconds']} s "
                        f"(cpu {rec['cpu_seconds']} s), {rec['peak_mb']} MB, load "
                        f"{rec['load_before']}->{rec['load_after']}",
                        flush=True,
                    )
        return
    compare(args.datasets, recompute=args.recompute_aestetik, reuse_only=args.reuse_only)


if __name__ == "__main__":
    main()
