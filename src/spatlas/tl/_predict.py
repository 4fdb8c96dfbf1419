"""Expression read from the H&E image: a linear probe from patch features to expression.

The task of RankByGene (MISSION §2.6): fit, on samples that have counts and an image, a map from
each spot's image features to its log-normalised expression of a gene set, and apply it to spots
that only have an image (a held-out section, or a slide without counts).

- **Targets**: ``log1p(counts / total × target_sum)`` of the chosen genes, the library size taken
  over all genes. Default genes: the ``n`` most variable genes of the **training** samples
  (Seurat v3 on their counts, batch = sample), so nothing of a held-out sample is looked at.
- **Features**: any per-spot image features (``obsm``), scaled per sample (each slide's columns
  z-scored on its own spots: stain and scanner shifts between slides are removed, and a new
  slide needs nothing but its own spots) or globally (the training spots' mean and deviation).
  Optionally aligned to expression by ``rank_align`` trained on the training samples only; new
  spots are embedded by its image branch (the EMA teacher).
- **Predictor**: multi-output ridge regression. The penalty is chosen by cross-validation grouped
  by training sample (each training sample predicted from the others, scored by the mean Pearson
  r over genes: the held-out metric itself), or over five spatial blocks when there is one
  training sample. With ``rank_align`` the aligner has seen the expression of every training
  spot, which flatters small penalties in that CV; the penalty is then chosen the way the
  predictor is used: a probe aligner and ridge trained without every third training sample,
  scored on those. Memory and time are linear in spots (one ``d x d`` Gram matrix per fold).

Everything is deterministic; the same seed gives the same numbers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .. import _keys as K
from .._errors import SpatlasInputError
from .._logging import logger
from ..io._write import atomic_path

FEATURE_SCALING = ("sample", "global")
ALIGNERS = ("none", "rank_align")
ALIGNER_FEATURES = ("both", "aligned")
_PREDICTOR_JSON = "predictor.json"
_PREDICTOR_ARRAYS = "predictor.npz"
_ALIGNER_DIR = "aligner"


# -- targets -----------------------------------------------------------------------------------


def _counts(adata: AnnData, layer: str | None, rows: np.ndarray | None = None) -> sp.csr_matrix:
    """The counts of ``rows`` (all spots by default) as float32 CSR; only those rows are copied."""
    if layer is None:
        layer = K.COUNTS if K.COUNTS in adata.layers else None
    X = adata.X if layer is None else adata.layers.get(layer)
    if X is None:
        raise SpatlasInputError(
            f"no counts: adata.layers['{layer}'] is missing" if layer else "adata.X is empty"
        )
    if rows is not None:
        X = X[rows]
    return sp.csr_matrix(X, dtype=np.float32)


def log_normalised(
    adata: AnnData,
    genes: Sequence[str],
    *,
    rows: np.ndarray | None = None,
    layer: str | None = None,
    target_sum: float = 1e4,
) -> np.ndarray:
    """``log1p(counts / library × target_sum)`` of ``genes`` for ``rows``, dense ``float32``.

    The library size is each spot's total over all genes; counts come from ``layers[layer]``,
    by default ``layers['counts']`` when present, else ``X``.
    """
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise SpatlasInputError(
            f"{len(missing)} of the predictor's genes are not in the data (e.g. "
            f"{', '.join(missing[:5])}); the same gene identifiers are needed"
        )
    X = _counts(adata, layer, rows)
    total = np.asarray(X.sum(axis=1)).ravel()
    cols = adata.var_names.get_indexer(list(genes))
    sub = X[:, cols].toarray()
    scale = np.divide(target_sum, total, out=np.zeros_like(total), where=total > 0)
    return np.log1p(sub * scale[:, None]).astype(np.float32)


def variable_genes(
    adata: AnnData,
    n: int,
    *,
    rows: np.ndarray | None = None,
    layer: str | None = None,
    sample_key: str = K.SAMPLE,
) -> list[str]:
    """The ``n`` most variable genes of ``rows`` (Seurat v3 on counts, batch = sample), ranked.

    Ranked as scanpy's ``seurat_v3`` flavour ranks them: by the median rank over samples, then
    by the number of samples in which the gene is highly variable.
    """
    import scanpy as sc

    rows = np.arange(adata.n_obs) if rows is None else np.asarray(rows)
    counts = _counts(adata, layer, rows)
    keep = np.asarray((counts > 0).sum(axis=0)).ravel() > 0
    if int(keep.sum()) < 2:
        raise SpatlasInputError("fewer than 2 genes are detected in the training spots")
    n = int(min(n, keep.sum()))
    sub = AnnData(X=counts[:, keep])
    sub.var_names = adata.var_names[keep]
    batches = adata.obs[sample_key].astype(str).to_numpy()[rows]
    batch_key = None
    if np.unique(batches).size > 1:
        sub.obs["batch"] = pd.Categorical(batches)
        batch_key = "batch"
    table = sc.pp.highly_variable_genes(
        sub, n_top_genes=n, flavor="seurat_v3", batch_key=batch_key, inplace=False
    )
    table.index = sub.var_names
    # scanpy's own order for flavor seurat_v3: median rank over batches, then in how many
    cols = [c for c in ("highly_variable_rank", "highly_variable_nbatches") if c in table]
    table = table.sort_values(
        cols, ascending=[True, False][: len(cols)], na_position="last", kind="stable"
    )
    return [str(g) for g in table.index[:n]]


def pearson_per_gene(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Pearson r of each column over rows; NaN where the measured column is constant.

    A constant prediction of a varying gene scores 0 (it explains nothing).
    """
    P = np.asarray(predicted, dtype=np.float64)
    Y = np.asarray(measured, dtype=np.float64)
    P = P - P.mean(axis=0)
    Y = Y - Y.mean(axis=0)
    sp_, sy = np.sqrt((P**2).sum(axis=0)), np.sqrt((Y**2).sum(axis=0))
    r = np.full(P.shape[1], np.nan)
    varying = sy > 1e-12
    ok = varying & (sp_ > 1e-12)
    r[ok] = (P[:, ok] * Y[:, ok]).sum(axis=0) / (sp_[ok] * sy[ok])
    r[varying & ~ok] = 0.0
    return r


# -- features ----------------------------------------------------------------------------------


def scale_features(
    X: np.ndarray, samples: np.ndarray, mode: str, stats: dict[str, list[float]] | None = None
) -> np.ndarray:
    """Per-sample z-scores (``sample``) or ``(X - shift) / scale`` with ``stats`` (``global``)."""
    if mode == "global":
        from ..models._spot import apply_scaler  # torch is imported only when models are used

        assert stats is not None
        return apply_scaler(np.asarray(X, dtype=np.float64), stats)
    X = np.asarray(X, dtype=np.float64)
    out = np.empty(X.shape, dtype=np.float32)
    for s in np.unique(samples):
        m = samples == s
        mean, std = X[m].mean(axis=0), X[m].std(axis=0)
        out[m] = (X[m] - mean) / np.where(std > 1e-12, std, 1.0)
    return out


def _features(adata: AnnData, key: str) -> np.ndarray:
    if key not in adata.obsm:
        raise SpatlasInputError(
            f"obsm['{key}'] is missing: compute the image features first "
            "(spatlas.pp.morphology_features, or morphology.enabled in the config)"
        )
    X = np.asarray(adata.obsm[key], dtype=np.float32)
    if X.ndim != 2 or X.shape[1] == 0:
        raise SpatlasInputError(f"obsm['{key}'] must be a 2-D (spots x features) array")
    if not np.isfinite(X).all():
        raise SpatlasInputError(f"obsm['{key}'] holds NaN or infinite values")
    return X


# -- ridge -------------------------------------------------------------------------------------


def _fold_groups(samples: np.ndarray, xy: np.ndarray | None, n_blocks: int = 5) -> np.ndarray:
    """CV groups: the samples, or ``n_blocks`` spatial blocks along x when there is one sample."""
    codes = np.unique(samples, return_inverse=True)[1].ravel()
    if codes.max() > 0 or xy is None:
        return codes
    order = np.argsort(xy[:, 0], kind="stable")
    groups = np.empty(len(order), dtype=np.int64)
    groups[order] = np.arange(len(order)) * n_blocks // len(order)
    return groups


def _ridge_fit(X: np.ndarray, Y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    mx, my = X.mean(axis=0), Y.mean(axis=0)
    Xc = X - mx
    G = Xc.T @ Xc
    G[np.diag_indices_from(G)] += alpha
    coef = np.linalg.solve(G, Xc.T @ (Y - my))
    return coef, my - mx @ coef


def _ridge_scores(
    X: np.ndarray,
    Y: np.ndarray,
    splits: list[tuple[np.ndarray, np.ndarray]],
    lambdas: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean Pearson r over genes of every ``(train, test)`` split for each penalty.

    Returns ``(scores (splits x lambdas), alphas)`` with
    ``alpha = lambda × mean eigenvalue of the training Gram`` (averaged over splits).
    """
    scores = np.full((len(splits), lambdas.size), np.nan)
    scale = []
    for i, (train, test) in enumerate(splits):
        Xtr, Ytr = X[train], Y[train]
        mx, my = Xtr.mean(axis=0), Ytr.mean(axis=0)
        Xc = Xtr - mx
        values, vectors = np.linalg.eigh(Xc.T @ Xc)
        values = np.clip(values, 0.0, None)
        mean_eig = max(float(values.mean()), 1e-12)
        scale.append(mean_eig)
        B = vectors.T @ (Xc.T @ (Ytr - my))
        Xte = (X[test] - mx) @ vectors
        for j, lam in enumerate(lambdas):
            pred = (Xte / (values + lam * mean_eig)) @ B + my
            scores[i, j] = np.nanmean(pearson_per_gene(pred, Y[test]))
    return scores, lambdas * float(np.mean(scale))


def _validation_groups(groups: np.ndarray) -> np.ndarray:
    """Every third CV group (at least one, never all): the aligner's validation samples."""
    ids = np.unique(groups)
    chosen = ids[2::3] if ids.size >= 3 else ids[-1:]
    return chosen


# -- the predictor -----------------------------------------------------------------------------


@dataclass
class ExpressionPredictor:
    """A fitted image -> expression predictor (see :func:`fit_expression_predictor`).

    Attributes
    ----------
    genes
        The predicted genes, most variable first.
    features_key
        obsm key of the image features it reads.
    n_features
        Width of those features.
    feature_scaling
        ``sample`` or ``global``.
    alpha
        Ridge penalty used.
    coef, intercept
        Ridge weights ``(d, n_genes)`` and intercepts on the (aligned, scaled) features.
    stats
        Feature scaling of the global mode (``shift``/``scale`` of the ridge input).
    aligner
        ``None`` or the ``rank_align`` image branch
        (:class:`~spatlas.models.rank_align.AlignedImageEncoder`).
    aligner_features
        ``both`` (the ridge reads the features and the aligned embedding) or ``aligned``.
    reduction
        With an aligner and wide features: the PCA (``mean``, ``components``) of the scaled
        features that the aligner reads.
    info
        Training samples, spots, the CV table of the penalty, settings.
    """

    genes: list[str]
    features_key: str
    n_features: int
    feature_scaling: str
    alpha: float
    coef: np.ndarray
    intercept: np.ndarray
    stats: dict[str, list[float]] | None = None
    aligner: Any = None
    aligner_model: Any = field(default=None, repr=False)
    reduction: dict[str, np.ndarray] | None = None
    aligner_features: str = "both"
    info: dict[str, Any] = field(default_factory=dict)

    def ridge_input(self, features: np.ndarray, samples: np.ndarray) -> np.ndarray:
        """The scaled (and, with an aligner, aligned then scaled) features the ridge reads."""
        X = np.asarray(features, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise SpatlasInputError(
                f"the predictor was fitted on {self.n_features} image features per spot "
                f"(obsm['{self.features_key}']), got {X.shape[1] if X.ndim == 2 else X.shape}; "
                "use the same extractor and settings"
            )
        if self.aligner is not None:
            Xs = scale_features(X, samples, self.feature_scaling, self.info.get("raw_stats"))
            if self.reduction is not None:
                Xs = _project(Xs, self.reduction)
            aligned = self.aligner(Xs)
            X = np.hstack([X, aligned]) if self.aligner_features == "both" else aligned
        return scale_features(X, samples, self.feature_scaling, self.stats)

    def predict(self, features: np.ndarray, samples: Sequence[str] | np.ndarray) -> np.ndarray:
        """Predicted log-normalised expression ``(n, n_genes)`` float32 of spots' features.

        ``samples`` names each spot's sample (per-sample scaling uses a slide's own spots).
        """
        samples = np.asarray(samples).astype(str)
        Z = self.ridge_input(features, samples).astype(np.float64)
        return (Z @ self.coef + self.intercept).astype(np.float32)

    # -- save / load

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the predictor to the folder ``path`` (JSON + arrays, aligner in ``aligner/``)."""
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise SpatlasInputError(f"{path} exists and is not empty; pass overwrite=True")
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "genes": self.genes,
            "features_key": self.features_key,
            "n_features": self.n_features,
            "feature_scaling": self.feature_scaling,
            "alpha": self.alpha,
            "stats": self.stats,
            "aligner": "rank_align" if self.aligner is not None else "none",
            "aligner_features": self.aligner_features,
            "info": _jsonable(self.info),
        }
        if self.aligner is not None:
            if self.aligner_model is None:
                raise SpatlasInputError(
                    "this predictor's aligner was loaded, not trained: save it from the original"
                )
            self.aligner_model.save(path / _ALIGNER_DIR, overwrite=overwrite)
        arrays = {"coef": self.coef, "intercept": self.intercept}
        arrays.update(_reduction_arrays(self.reduction))
        with atomic_path(path / _PREDICTOR_ARRAYS) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)  # a file object: savez would add .npz to a path
        with atomic_path(path / _PREDICTOR_JSON) as tmp:
            tmp.write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> ExpressionPredictor:
        """Read a predictor written by :meth:`save` (no training data needed)."""
        path = Path(path)
        if not (path / _PREDICTOR_JSON).exists() or not (path / _PREDICTOR_ARRAYS).exists():
            raise SpatlasInputError(
                f"{path} holds no saved expression predictor "
                f"({_PREDICTOR_JSON} + {_PREDICTOR_ARRAYS})"
            )
        meta = json.loads((path / _PREDICTOR_JSON).read_text())
        arrays = np.load(path / _PREDICTOR_ARRAYS)
        aligner = None
        if meta["aligner"] == "rank_align":
            from ..models.rank_align import AlignedImageEncoder

            aligner = AlignedImageEncoder.load(path / _ALIGNER_DIR)
        return cls(
            genes=list(meta["genes"]),
            features_key=meta["features_key"],
            n_features=int(meta["n_features"]),
            feature_scaling=meta["feature_scaling"],
            alpha=float(meta["alpha"]),
            coef=arrays["coef"],
            intercept=arrays["intercept"],
            stats=meta["stats"],
            aligner=aligner,
            info=meta["info"],
            aligner_features=meta.get("aligner_features", "both"),
            reduction=(
                {"mean": arrays["reduction_mean"], "components": arrays["reduction_components"]}
                if "reduction_mean" in arrays
                else None
            ),
        )


def _reduction_arrays(reduction: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    if reduction is None:
        return {}
    return {
        "reduction_mean": reduction["mean"],
        "reduction_components": reduction["components"],
    }


def _pca_reduction(X: np.ndarray, n_comps: int) -> dict[str, np.ndarray]:
    """PCA of ``X``'s columns (covariance, deterministic signs): mean and ``(d, k)`` components."""
    X = np.asarray(X, dtype=np.float64)
    mean = X.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(X - mean, rowvar=False))
    order = np.argsort(values)[::-1][: min(n_comps, X.shape[0] - 1)]
    vectors = vectors[:, order]
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(vectors.shape[1])])
    return {"mean": mean, "components": vectors * np.where(signs == 0, 1.0, signs)}


def _project(X: np.ndarray, reduction: dict[str, np.ndarray]) -> np.ndarray:
    return ((np.asarray(X, dtype=np.float64) - reduction["mean"]) @ reduction["components"]).astype(
        np.float32
    )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _sample_rows(
    adata: AnnData, samples: Sequence[str] | None, sample_key: str, what: str
) -> np.ndarray:
    names = adata.obs[sample_key].astype(str).to_numpy()
    if samples is None:
        return np.ones(adata.n_obs, dtype=bool)
    samples = [str(s) for s in samples]
    unknown = sorted(set(samples) - set(names))
    if unknown:
        raise SpatlasInputError(
            f"{what}: unknown sample(s) {', '.join(unknown)} (the cohort has "
            f"{', '.join(pd.unique(names)[:10])})"
        )
    return np.isin(names, samples)


def fit_expression_predictor(
    adata: AnnData,
    *,
    features_key: str = K.MORPH_FEATURES,
    genes: int | Sequence[str] = 250,
    train_samples: Sequence[str] | None = None,
    exclude_samples: Sequence[str] = (),
    feature_scaling: str = "sample",
    alpha: float | str = "auto",
    aligner: str = "none",
    aligner_params: dict | None = None,
    aligner_pcs: int | None = 50,
    aligner_features: str = "both",
    layer: str | None = None,
    target_sum: float = 1e4,
    sample_key: str = K.SAMPLE,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> ExpressionPredictor:
    """Fit a predictor of log-normalised expression from per-spot image features.

    Parameters
    ----------
    adata
        Cohort with counts (``layers['counts']`` or ``X``) and ``obsm[features_key]``.
    features_key
        obsm key of the image features (e.g. ``X_morph_features`` from
        :func:`spatlas.pp.morphology_features`, any extractor).
    genes
        Number of most variable genes of the training samples to predict, or a list of genes.
    train_samples
        Samples to fit on; default every sample not in ``exclude_samples``.
    exclude_samples
        Samples whose counts the predictor must not see (held out for evaluation).
    feature_scaling
        ``sample``: each slide's features z-scored on its own spots; ``global``: with the
        training spots' mean and deviation.
    alpha
        Ridge penalty, or ``auto``: chosen from 13 values (1e-3 to 1e3 times the mean eigenvalue
        of the Gram matrix) by the mean Pearson r of CV grouped by training sample (with
        ``rank_align``: on every third training sample, left out of a probe aligner).
    aligner
        ``none`` or ``rank_align``: train ``rank_align`` on the training samples (expression =
        20 PCs of the standardised target genes) and feed its aligned image embedding (the EMA
        teacher's) to the ridge.
    aligner_pcs
        The aligner reads this many principal components of the scaled features when they are
        wider (an MLP on 1,280 raw network features and a few thousand spots overfits); ``None``:
        the features themselves.
    aligner_features
        With an aligner: ``both`` (default), the ridge reads the image features and the aligned
        embedding side by side, so the alignment can only add what the features lack; or
        ``aligned``, the aligned embedding alone.
    aligner_params
        ``rank_align`` settings: constructor ones (``latent_dim``, ``hidden``, ``dropout``) and
        ``train()`` ones (``steps``, ``batch_size``, ``lr``, ...). Defaults: latent 64; the
        steps (300 or 1000) that predict the validation samples best.
    layer
        Counts layer (default ``counts`` when present, else ``X``).
    target_sum
        Library size of the normalisation.
    sample_key
        obs column of the sample.
    seed, device, progress
        Seed of the aligner's training, its device, progress bar.

    Returns
    -------
    The fitted :class:`ExpressionPredictor`; ``info['cv']`` holds the penalty's CV table.
    """
    if feature_scaling not in FEATURE_SCALING:
        raise SpatlasInputError(
            f"feature_scaling must be one of {', '.join(FEATURE_SCALING)} (got {feature_scaling!r})"
        )
    if aligner_pcs is not None and aligner_pcs < 2:
        raise SpatlasInputError(f"aligner_pcs must be >= 2 or None (got {aligner_pcs})")
    if aligner_features not in ALIGNER_FEATURES:
        raise SpatlasInputError(
            f"aligner_features must be one of {', '.join(ALIGNER_FEATURES)} "
            f"(got {aligner_features!r})"
        )
    if aligner not in ALIGNERS:
        raise SpatlasInputError(f"aligner must be one of {', '.join(ALIGNERS)} (got {aligner!r})")
    if isinstance(alpha, str) and alpha != "auto":
        raise SpatlasInputError(f"alpha must be a number > 0 or 'auto' (got {alpha!r})")
    if not isinstance(alpha, str) and not alpha > 0:
        raise SpatlasInputError(f"alpha must be > 0 (got {alpha})")
    if sample_key not in adata.obs:
        raise SpatlasInputError(f"obs['{sample_key}'] is missing (the sample of each spot)")
    features = _features(adata, features_key)
    names = adata.obs[sample_key].astype(str).to_numpy()
    train = _sample_rows(adata, train_samples, sample_key, "train_samples")
    if len(exclude_samples):
        train &= ~_sample_rows(adata, list(exclude_samples), sample_key, "exclude_samples")
    rows = np.flatnonzero(train)
    if rows.size < 10:
        raise SpatlasInputError(
            f"only {rows.size} training spots; the predictor needs samples with counts and images"
        )
    if isinstance(genes, int | np.integer):
        if genes < 1:
            raise SpatlasInputError(f"genes must be >= 1 (got {genes})")
        gene_list = variable_genes(adata, int(genes), rows=rows, layer=layer, sample_key=sample_key)
    else:
        gene_list = [str(g) for g in genes]
        if not gene_list:
            raise SpatlasInputError("genes is an empty list")
    Y = log_normalised(adata, gene_list, rows=rows, layer=layer, target_sum=target_sum).astype(
        np.float64
    )
    train_names = names[rows]
    X = features[rows]
    from ..models._spot import standard_scaler

    raw_stats = standard_scaler(X) if feature_scaling == "global" else None
    aligner_obj = aligner_model = reduction = None
    aligner_info: dict[str, Any] = {}
    xy = np.asarray(adata.obsm[K.SPATIAL])[rows] if K.SPATIAL in adata.obsm else None
    groups = _fold_groups(train_names, xy)
    lambdas = np.logspace(-3, 3, 13)
    if aligner == "rank_align":
        if np.unique(groups).size < 2:
            raise SpatlasInputError("aligner rank_align needs at least 2 training spots groups")
        Xs = scale_features(X, train_names, feature_scaling, raw_stats)
        if aligner_pcs is not None and Xs.shape[1] > aligner_pcs:
            reduction = _pca_reduction(Xs, aligner_pcs)
            Xs = _project(Xs, reduction)
        params = dict(aligner_params or {})
        candidates = [params.pop("steps")] if "steps" in params else list(ALIGNER_STEPS)
        align = {"seed": seed, "device": device, "progress": progress}
        # The aligner has seen the expression of every spot it was trained on, so CV among
        # those spots flatters small penalties. Choose the penalty (and the training length)
        # as the predictor is used: a probe aligner and a ridge trained on some training
        # samples, scored on the others.
        val_ids = _validation_groups(groups)
        val = np.isin(groups, val_ids)
        splits = [(~val, groups == g) for g in val_ids]
        best_score = -np.inf
        probe_scores = {}
        for steps in candidates:
            probe = _train_rank_align(
                Xs[~val], Y[~val], train_names[~val], params={**params, "steps": steps}, **align
            ).image_encoder()
            A = probe(Xs)
            if aligner_features == "both":
                A = np.hstack([X, A])
            Zv = scale_features(
                A, train_names, feature_scaling, standard_scaler(A[~val]) if raw_stats else None
            ).astype(np.float64)
            scores, grid = _ridge_scores(Zv, Y, splits, lambdas)
            mean = np.nanmean(scores, axis=0)
            probe_scores[int(steps)] = float(np.nanmax(mean))
            if np.nanmax(mean) > best_score:
                best_score, best_steps, cv_scores, alphas = np.nanmax(mean), steps, scores, grid
        fold_ids = val_ids
        aligner_model = _train_rank_align(
            Xs, Y, train_names, params={**params, "steps": best_steps}, **align
        )
        aligner_obj = aligner_model.image_encoder()
        aligner_info = {
            "init": aligner_model.init_params,
            "train": aligner_model.train_params,
            "pcs": None if reduction is None else int(reduction["components"].shape[1]),
            "probe_r_by_steps": probe_scores,
        }
        aligned = aligner_obj(Xs)
        X = np.hstack([X, aligned]) if aligner_features == "both" else aligned
    stats = standard_scaler(X) if feature_scaling == "global" else None
    Z = scale_features(X, train_names, feature_scaling, stats).astype(np.float64)
    if aligner == "none":
        fold_ids = np.unique(groups)
        splits = [(groups != g, groups == g) for g in fold_ids]
        cv_scores, alphas = _ridge_scores(Z, Y, splits, lambdas)
    mean_cv = np.nanmean(cv_scores, axis=0)
    if alpha == "auto":
        best = int(np.nanargmax(mean_cv))
        alpha_used = float(alphas[best])
    else:
        alpha_used = float(alpha)
    coef, intercept = _ridge_fit(Z, Y, alpha_used)
    sample_names = np.unique(train_names)
    fold_names = [str(sample_names[g]) if sample_names.size > 1 else f"block{g}" for g in fold_ids]
    info = {
        "train_samples": [str(s) for s in pd.unique(train_names)],
        "n_train_spots": int(rows.size),
        "target_sum": float(target_sum),
        "layer": layer,
        "raw_stats": raw_stats,
        "cv": {
            "groups": fold_names,
            "alphas": alphas.tolist(),
            "mean_r": mean_cv.tolist(),
            "per_group_r": cv_scores.tolist(),
            "chosen": alpha == "auto",
            "cv_r_at_alpha": float(mean_cv[int(np.argmin(np.abs(alphas - alpha_used)))]),
        },
        "aligner": aligner_info,
        "seed": seed,
    }
    logger.info(
        "expression predictor: %d genes from %d %s features of %d spots (%d samples)%s; "
        "ridge alpha %.3g, grouped-CV mean r %.3f",
        len(gene_list),
        features.shape[1],
        features_key,
        rows.size,
        len(info["train_samples"]),
        ", rank_align-aligned" if aligner_obj is not None else "",
        alpha_used,
        info["cv"]["cv_r_at_alpha"],
    )
    return ExpressionPredictor(
        genes=gene_list,
        features_key=features_key,
        n_features=features.shape[1],
        feature_scaling=feature_scaling,
        alpha=alpha_used,
        coef=coef.astype(np.float64),
        intercept=intercept.astype(np.float64),
        stats=stats,
        aligner=aligner_obj,
        aligner_model=aligner_model,
        reduction=reduction,
        aligner_features=aligner_features,
        info=info,
    )


# training lengths of the aligner tried on the validation samples (unless steps is given)
ALIGNER_STEPS = (300, 1000)
# set by fit_expression_predictor itself, not through aligner_params
_RANK_ALIGN_FIXED = ("expression_key", "morphology_key", "sample_key", "coords", "n_neighbors")


def check_aligner_params(params: dict) -> tuple[dict, dict]:
    """``rank_align`` constructor and ``train()`` settings of ``aligner_params`` (checked)."""
    from ..models.rank_align import RankAlign

    fixed = sorted(set(params) & set(_RANK_ALIGN_FIXED))
    if fixed:
        raise SpatlasInputError(
            f"aligner_params: {', '.join(fixed)} are set by the predictor (the aligner sees the "
            "spot's own image features and the training expression)"
        )
    init, train = RankAlign.split_params(dict(params))
    return {"latent_dim": 64, **init}, train


def _train_rank_align(
    X: np.ndarray,
    Y: np.ndarray,
    samples: np.ndarray,
    *,
    params: dict,
    seed: int,
    device: str,
    progress: bool,
):
    """``rank_align`` on the training spots: expression = 20 PCs of the standardised targets."""
    from ..models.rank_align import RankAlign
    from ..pp.morphology import standardized_pca

    init, train = check_aligner_params(params)
    pcs = standardized_pca(Y.astype(np.float32), n_comps=min(20, Y.shape[1]))[0]
    obs = pd.DataFrame(
        {K.SAMPLE: pd.Categorical(samples)}, index=[str(i) for i in range(len(samples))]
    )
    tmp = AnnData(obs=obs)
    tmp.obsm["X_expression"] = pcs
    tmp.obsm["X_image"] = np.asarray(X, dtype=np.float32)
    tmp.obsm[K.SPATIAL] = np.zeros((len(samples), 2))
    model = RankAlign(
        tmp, expression_key="X_expression", morphology_key="X_image", n_neighbors=0, **init
    )
    model.train(**{"seed": seed, "device": device, "progress": progress, **train})
    return model


def predict_expression(
    adata: AnnData,
    predictor: ExpressionPredictor | str | Path,
    *,
    samples: Sequence[str] | None = None,
    features_key: str | None = None,
    sample_key: str = K.SAMPLE,
    key_added: str = K.PREDICTED_EXPRESSION,
) -> str:
    """Predict log-normalised expression of every spot (or of ``samples``) from its image.

    Needs only the image features: the spots may have no counts at all.

    Parameters
    ----------
    adata
        Spots with ``obsm[features_key]`` (the predictor's extractor and settings).
    predictor
        A fitted :class:`ExpressionPredictor` or the folder it was saved to.
    samples
        Predict these samples only (other rows are NaN); default all.
    features_key
        Default: the key the predictor was fitted on.
    sample_key
        obs column of the sample (per-sample feature scaling uses a slide's own spots).
    key_added
        obsm key of the prediction, ``(n_spots, n_genes)`` float32; the genes are listed in
        ``uns['spatlas']['predicted_expression'][key_added]['genes']``.

    Returns
    -------
    ``key_added``.
    """
    if not isinstance(predictor, ExpressionPredictor):
        predictor = ExpressionPredictor.load(predictor)
    key = features_key or predictor.features_key
    features = _features(adata, key)
    if sample_key not in adata.obs:
        raise SpatlasInputError(f"obs['{sample_key}'] is missing (the sample of each spot)")
    rows = _sample_rows(adata, samples, sample_key, "samples")
    names = adata.obs[sample_key].astype(str).to_numpy()
    out = np.full((adata.n_obs, len(predictor.genes)), np.nan, dtype=np.float32)
    out[rows] = predictor.predict(features[rows], names[rows])
    adata.obsm[key_added] = out
    adata.uns.setdefault(K.UNS, {}).setdefault(K.PREDICTED, {})[key_added] = {
        "genes": list(predictor.genes),
        "features_key": key,
        "train_samples": list(predictor.info.get("train_samples", [])),
        "aligner": "rank_align" if predictor.aligner is not None else "none",
        "feature_scaling": predictor.feature_scaling,
        "alpha": predictor.alpha,
    }
    logger.info(
        "predicted %d genes for %d spots from obsm['%s'] -> obsm['%s']",
        len(predictor.genes),
        int(rows.sum()),
        key,
        key_added,
    )
    return key_added


def expression_correlation(
    adata: AnnData,
    *,
    predicted_key: str = K.PREDICTED_EXPRESSION,
    samples: Sequence[str] | None = None,
    layer: str | None = None,
    target_sum: float = 1e4,
    sample_key: str = K.SAMPLE,
) -> pd.DataFrame:
    """Per sample and gene: Pearson r of predicted vs measured log-normalised expression.

    Returns a tidy table (``sample``, ``gene``, ``rank`` = the gene's variability rank in the
    predictor, ``r``, ``mean_measured``); r is NaN where the gene does not vary in the sample.
    """
    if predicted_key not in adata.obsm:
        raise SpatlasInputError(f"obsm['{predicted_key}'] is missing; run predict_expression first")
    meta = adata.uns.get(K.UNS, {}).get(K.PREDICTED, {}).get(predicted_key)
    if meta is None:
        raise SpatlasInputError(
            f"uns['spatlas']['{K.PREDICTED}'] has no record of '{predicted_key}'"
        )
    genes = list(meta["genes"])
    names = adata.obs[sample_key].astype(str).to_numpy()
    wanted = pd.unique(names) if samples is None else [str(s) for s in samples]
    pred_all = np.asarray(adata.obsm[predicted_key])
    frames = []
    for s in wanted:
        rows = np.flatnonzero(names == s)
        if rows.size == 0:
            raise SpatlasInputError(f"sample {s!r} is not in the cohort")
        pred = pred_all[rows]
        if np.isnan(pred).any():
            raise SpatlasInputError(f"sample {s!r} has no prediction in obsm['{predicted_key}']")
        measured = log_normalised(adata, genes, rows=rows, layer=layer, target_sum=target_sum)
        frames.append(
            pd.DataFrame(
                {
                    "sample": s,
                    "gene": genes,
                    "rank": np.arange(1, len(genes) + 1),
                    "r": pearson_per_gene(pred, measured),
                    "mean_measured": measured.mean(axis=0),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def correlation_summary(
    table: pd.DataFrame, *, top: Sequence[int] = (50, 250), threshold: float = 0.3
) -> pd.DataFrame:
    """Per sample: mean r over the top ``n`` genes for each ``n`` in ``top``, and genes > r.

    ``n_genes_r>threshold`` counts the genes (of all predicted) with r above ``threshold``.
    """
    rows = []
    for s, part in table.groupby("sample", sort=False):
        row: dict[str, Any] = {"sample": s}
        for n in top:
            row[f"mean_r_top{n}"] = float(np.nanmean(part.loc[part["rank"] <= n, "r"]))
        row[f"n_genes_r>{threshold:g}"] = int((part["r"] > threshold).sum())
        row["n_genes"] = len(part)
        rows.append(row)
    return pd.DataFrame(rows)
