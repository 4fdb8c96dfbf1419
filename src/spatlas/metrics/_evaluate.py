"""Composite score and the ``evaluate`` orchestrator returning a tidy per-sample table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from time import perf_counter
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .. import _keys as K
from .._errors import SpatlasInputError
from .._logging import logger
from ._batch import asw_batch, ilisi, kbet
from ._bio import ASW_MAX_SPOTS, ari, ari_donor, asw_label, nmi
from ._neighbors import as_embedding, codes, neighbors, subsample

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

#: Metrics averaged into the bio part / the batch part of the composite score.
BIO_METRICS = ("ari", "nmi", "asw_label")
BATCH_METRICS = ("ilisi", "kbet")
#: Columns of :func:`evaluate`'s table, in order.
COLUMNS = (
    "sample",
    "n_spots",
    "n_labelled",
    *BIO_METRICS,
    "asw_batch",
    *BATCH_METRICS,
    "composite",
    "ari_donor",
    "batch_metric_spots",
    "asw_spots",
)
MEAN_ROW = "mean"
ALL_ROW = "all"

# Neighbourhood sizes of the paper's §3.3 metrics (spot itself not counted for iLISI,
# counted for kBET); one kNN search serves both.
_K_LISI = 90
_K_KBET = 50
#: Above this many spots, the batch metrics (batch ASW, iLISI, kBET) are computed on a
#: deterministic random subsample of this many spots (neighbours searched within it), so their
#: cost stops growing with the cohort. Below it (every benchmark cohort of a few tens of
#: thousands of spots) they are exact.
BATCH_MAX_SPOTS = 50_000
#: Per sample, the label silhouette uses a deterministic subsample of at most this many labelled
#: spots (a Visium slide holds at most 4,992 spots, so it is exact there; a 50,000-bin Visium HD
#: sample costs 0.3 s instead of 4 s, which adds up over an atlas' samples). The pooled ``all``
#: row keeps :data:`~spatlas.metrics._bio.ASW_MAX_SPOTS`.
SAMPLE_ASW_MAX_SPOTS = 5_000


def _values(scores: Mapping[str, float] | Iterable[float]) -> np.ndarray:
    vals = scores.values() if isinstance(scores, Mapping) else scores
    return np.asarray(list(vals), dtype=np.float64)


def composite(
    bio: Mapping[str, float] | Iterable[float],
    batch: Mapping[str, float] | Iterable[float],
    lam: float = 0.6,
) -> float:
    """Composite score ``λ · mean(bio) + (1 − λ) · mean(batch)`` (paper §3.3).

    Parameters
    ----------
    bio
        Bio-conservation scores (ARI, NMI, label ASW), as a dict or a sequence.
    batch
        Batch-mixing scores (iLISI, kBET), as a dict or a sequence.
    lam
        Weight λ of the bio part, in [0, 1].

    Returns
    -------
    float
        The composite; NaN if any score entering it with a non-zero weight is NaN.
    """
    if not 0.0 <= lam <= 1.0:
        raise SpatlasInputError(f"lam must be in [0, 1], got {lam}.")
    b, t = _values(bio), _values(batch)
    if (lam > 0 and b.size == 0) or (lam < 1 and t.size == 0):
        raise SpatlasInputError("composite needs at least one bio and one batch score.")
    bio_part = lam * b.mean() if lam > 0 else 0.0
    batch_part = (1.0 - lam) * t.mean() if lam < 1 else 0.0
    return float(bio_part + batch_part)


def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def _bio_metrics(
    clusters, labels, X: np.ndarray | None, seed: int, max_asw: int = ASW_MAX_SPOTS
) -> dict[str, float]:
    """ARI, NMI and label ASW on the labelled spots (NaN when there are none)."""
    if labels is None or pd.isna(labels).all():
        return {**dict.fromkeys(BIO_METRICS, float("nan")), "asw_spots": float("nan")}
    n_labelled = int((~pd.isna(labels)).sum())
    has_x = X is not None
    return {
        "ari": ari(labels, clusters),
        "nmi": nmi(labels, clusters),
        "asw_label": asw_label(X, labels, max_spots=max_asw, seed=seed) if has_x else np.nan,
        "asw_spots": min(n_labelled, max_asw) if has_x else float("nan"),
    }


def _batch_metrics(X: np.ndarray | None, batch, labels, seed: int) -> dict[str, float]:
    """Batch ASW, iLISI and kBET; NaN without an embedding or with fewer than 2 batches."""
    nan = {
        "asw_batch": float("nan"),
        "ilisi": float("nan"),
        "kbet": float("nan"),
        "batch_metric_spots": float("nan"),
    }
    if X is None or codes(batch, "batch")[1] < 2:
        return nan
    if X.shape[0] > BATCH_MAX_SPOTS:
        rows = subsample(X.shape[0], BATCH_MAX_SPOTS, seed)
        logger.info(
            "evaluate: batch metrics on a deterministic subsample of %d of %d spots",
            rows.size,
            X.shape[0],
        )
        X, batch = X[rows], np.asarray(batch, dtype=object)[rows]
        labels = None if labels is None else np.asarray(labels, dtype=object)[rows]
    has_labels = labels is not None and not pd.isna(labels).all()
    knn = neighbors(X, max(_K_LISI, _K_KBET - 1), seed=seed)
    return {
        "asw_batch": asw_batch(X, batch, labels if has_labels else None, seed=seed),
        "ilisi": ilisi(knn, batch, k=_K_LISI),
        "kbet": (
            kbet(X, batch, labels=labels, k=_K_KBET, seed=seed)
            if has_labels
            else kbet(knn, batch, k=_K_KBET)
        ),
        "batch_metric_spots": int(X.shape[0]),
    }


def _row(sample, n_spots: int, n_labelled: int, bio, batch, donor_score, lam) -> dict:
    row = {"sample": sample, "n_spots": n_spots, "n_labelled": n_labelled, **bio, **batch}
    row.setdefault("asw_spots", float("nan"))
    row["composite"] = composite(
        {m: row[m] for m in BIO_METRICS}, {m: row[m] for m in BATCH_METRICS}, lam
    )
    row["ari_donor"] = donor_score
    return row


def _present_in_order(values: pd.Series) -> list:
    """Distinct values in category order (categoricals) or order of first appearance."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        present = set(values.dropna().unique())
        return [c for c in values.cat.categories if c in present]
    return list(pd.unique(values.dropna()))


def evaluate(
    adata: AnnData,
    *,
    cluster_key: str,
    embedding_key: str | None = None,
    label_key: str = K.LABEL,
    sample_key: str = K.SAMPLE,
    donor_key: str = K.DONOR,
    batch_key: str = K.SAMPLE,
    exclude_labels: Iterable[str] | str = (),
    lam: float = 0.6,
    seed: int = 0,
) -> pd.DataFrame:
    """Score clusters and an embedding per sample and pooled, as in the paper's §3.3.

    Label metrics (ARI, NMI, label ASW) use only labelled spots: spots whose label is missing
    (NaN / None) or listed in ``exclude_labels`` (e.g. her2st's ``'undetermined'``) are left
    out. Batch metrics (batch ASW, iLISI with k = 90 and perplexity 30, kBET with k = 50 and
    α = 0.05) need ``embedding_key`` and at least two batches. kBET is computed per label and
    averaged when labels are present (as scib does) and on all spots otherwise; batch ASW is
    per label when labels are present and over all spots as one group otherwise. Silhouettes on
    more than 20,000 spots (per sample: 5,000) use a deterministic subsample (see
    :func:`asw_label`); on more than
    ``BATCH_MAX_SPOTS`` (50,000) spots, the batch metrics are computed on a deterministic random
    subsample of that many spots (neighbours searched within it). The table records the spots
    used: ``batch_metric_spots`` (batch ASW, iLISI, kBET) and ``asw_spots`` (label ASW).

    Parameters
    ----------
    adata
        Spots of all samples; not modified.
    cluster_key
        ``obs`` column of predicted domains / clusters.
    embedding_key
        ``obsm`` key of the embedding for the silhouettes and batch metrics; ``None`` skips them.
    label_key
        ``obs`` column of ground-truth domains; if absent, only batch metrics and ARI donor are
        computed.
    sample_key
        ``obs`` column of the sample id (one row per sample).
    donor_key
        ``obs`` column of the donor id for ARI donor; if absent, ARI donor is NaN.
    batch_key
        ``obs`` column whose mixing the batch metrics measure.
    exclude_labels
        Label values treated as unlabelled.
    lam
        Weight of the bio part of the composite score.
    seed
        Seed of every subsample.

    Returns
    -------
    pandas.DataFrame
        One row per sample (in category / first-appearance order), then a ``mean`` row and an
        ``all`` row, with columns ``sample, n_spots, n_labelled, ari, nmi, asw_label,
        asw_batch, ilisi, kbet, composite, ari_donor, batch_metric_spots, asw_spots``.

        - per-sample rows: bio metrics on the sample's labelled spots (NaN if it has none);
          batch metrics, composite and ARI donor only if the sample itself holds ≥ 2 batches /
          donors (normally NaN: a sample is one batch and one donor).
        - ``mean``: bio metrics averaged over the samples that have labelled spots (a NaN
          sample value, e.g. the ASW of a sample with one label, is skipped); batch metrics
          and ARI donor repeat the pooled ``all`` values; the composite combines the two;
          ``n_spots`` and ``n_labelled`` are totals over the averaged samples.
        - ``all``: every metric pooled over all spots (bio metrics over all labelled spots).
    """
    obs = adata.obs
    missing = [key for key in (cluster_key, sample_key) if key not in obs.columns]
    if embedding_key is not None and batch_key not in obs.columns:
        missing.append(batch_key)
    if missing:
        raise SpatlasInputError(f"adata.obs has no column(s) {missing}; pass the right key names.")
    if embedding_key is not None and embedding_key not in adata.obsm:
        raise SpatlasInputError(
            f"adata.obsm has no {embedding_key!r}; available: {sorted(adata.obsm.keys())}."
        )
    if isinstance(exclude_labels, str):
        exclude_labels = (exclude_labels,)
    exclude_labels = list(exclude_labels)

    t0 = perf_counter()
    X = as_embedding(adata.obsm[embedding_key], embedding_key) if embedding_key else None
    clusters = obs[cluster_key].to_numpy(dtype=object)
    samples = obs[sample_key]
    if samples.isna().any():
        raise SpatlasInputError(f"obs[{sample_key!r}] has missing values.")
    batch = obs[batch_key].to_numpy(dtype=object) if embedding_key is not None else None
    donors = obs[donor_key].to_numpy(dtype=object) if donor_key in obs.columns else None
    labels = None
    if label_key in obs.columns:
        lab = obs[label_key]
        unlabelled = lab.isna().to_numpy() | lab.isin(exclude_labels).to_numpy()
        labels = lab.to_numpy(dtype=object).copy()
        labels[unlabelled] = None
    else:
        logger.info("evaluate: no obs[%r]; computing batch metrics and ARI donor only", label_key)
    n_labelled_all = 0 if labels is None else int((~pd.isna(labels)).sum())

    def donor_score(rows: np.ndarray) -> float:
        return float("nan") if donors is None else ari_donor(clusters[rows], donors[rows])

    rows_out = []
    sample_values = samples.to_numpy(dtype=object)
    for sample in _present_in_order(samples):
        rows = np.flatnonzero(sample_values == sample)
        lab_s = None if labels is None else labels[rows]
        n_lab = 0 if lab_s is None else int((~pd.isna(lab_s)).sum())
        X_s = None if X is None else X[rows]
        bio = _bio_metrics(clusters[rows], lab_s, X_s, seed, SAMPLE_ASW_MAX_SPOTS)
        bat = _batch_metrics(X_s, None if batch is None else batch[rows], lab_s, seed)
        rows_out.append(_row(sample, len(rows), n_lab, bio, bat, donor_score(rows), lam))

    all_rows = np.arange(adata.n_obs)
    pooled = _row(
        ALL_ROW,
        adata.n_obs,
        n_labelled_all,
        _bio_metrics(clusters, labels, X, seed),
        _batch_metrics(X, batch, labels, seed),
        donor_score(all_rows),
        lam,
    )

    labelled = [r for r in rows_out if r["n_labelled"] > 0]
    mean_bio = {m: _nanmean([r[m] for r in labelled]) for m in BIO_METRICS}
    mean_bio["asw_spots"] = sum(r["asw_spots"] for r in labelled if pd.notna(r["asw_spots"]))
    mean_row = _row(
        MEAN_ROW,
        sum(r["n_spots"] for r in labelled),
        sum(r["n_labelled"] for r in labelled),
        mean_bio,
        {m: pooled[m] for m in ("asw_batch", *BATCH_METRICS, "batch_metric_spots")},
        pooled["ari_donor"],
        lam,
    )

    table = pd.DataFrame([*rows_out, mean_row, pooled], columns=list(COLUMNS))
    table["sample"] = table["sample"].astype(str)
    logger.info(
        "evaluate: %d spots, %d samples, %d labelled spots in %.1f s",
        adata.n_obs,
        len(rows_out),
        n_labelled_all,
        perf_counter() - t0,
    )
    return table
